# Two commands for a newcomer: `make repro` (data -> scored submission) and `make test`.
# Both create .venv with the pinned dependencies when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DVC: no analytics, no update checks, no remote needed.
export DVC_NO_ANALYTICS := 1
export DVC_NO_UPDATE_CHECK := 1

.PHONY: repro test test-all bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else "Python 3.11 required (MXNet 1.9.1 needs numpy 1.23.5, and constraints.txt pins a set resolved for 3.11); found %d.%d: set PYTHON=python3.11" % v)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=23"
	# numpy stays pinned in every install: a newer one breaks `import mxnet` (np.bool).
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "numpy==1.23.5" -e ".[dev]"
	$(PY) -c "import mxnet, numpy; assert numpy.__version__ == '1.23.5', numpy.__version__"
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "not gpu" -n auto --dist loadfile

bench: $(STAMP)
	$(PY) -m pipeline.tools.bench

clean:
	rm -rf data/records data/sample checkpoints predictions metrics plots reports submissions/*.csv*
