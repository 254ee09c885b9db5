"""The project's errors and the one way a stage reports them.

Every error a user can cause (a bad setting, a missing or stale input, a file that cannot be
written) is a :class:`PipelineError` (or an ``OSError`` from the file system). A stage's
``main()`` runs its core inside :func:`stage_errors`, which turns them into one line
``<stage> failed: <every problem and the fix>`` and exit code 1. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import sys
from typing import Iterator


class PipelineError(Exception):
    """Base of the errors a user can cause; the message names every problem and the fix."""


class Stopped(PipelineError):
    """The run stopped on request (SIGTERM, SIGINT) after saving its work; rerun to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def one_line(message: str) -> str:
    """``message`` on one line: a list under ``...:`` becomes ``...: a; b; c``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head, rest = lines[0], lines[1:]
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def describe_os_error(exc: OSError) -> str:
    """What went wrong with which file, in words (no errno numbers)."""
    where = exc.filename if exc.filename is not None else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device of {where}" if where else "no space left on device"
    what = exc.strerror or str(exc)
    return f"{what}: {where}" if where else what


@contextlib.contextmanager
def stage_errors(stage: str) -> Iterator[None]:
    """Turn the project's errors raised inside into ``SystemExit('<stage> failed: ...')``."""
    try:
        yield
    except Stopped as exc:  # a requested stop, not a failure: the signal's usual exit code
        print(f"{stage} stopped: {one_line(str(exc))}", file=sys.stderr, flush=True)
        raise SystemExit(128 + exc.signum) from None
    except KeyboardInterrupt:  # Ctrl-C outside a graceful-stop block: outputs are atomic
        print(f"{stage} stopped: interrupted (SIGINT); nothing half-written is kept, rerun it "
              "to start again", file=sys.stderr, flush=True)
        raise SystemExit(128 + 2) from None
    except PipelineError as exc:
        raise SystemExit(f"{stage} failed: {one_line(str(exc))}") from None
    except OSError as exc:
        raise SystemExit(f"{stage} failed: {describe_os_error(exc)}") from None
