"""Graceful stop: the first SIGTERM/SIGINT asks a long run to stop at its next safe point.

Clusters and clouds (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before
SIGKILL. Inside :func:`graceful_stop` the first SIGTERM or SIGINT only sets a flag that the
run polls between batches, so it can save its work and exit cleanly; a second signal restores
the default action and re-raises it, stopping at once (what an impatient Ctrl-C expects).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def graceful_stop(what: str) -> Iterator[Callable[[], int | None]]:
    """Yield a function returning the number of the first stop signal received, or None.

    Outside the main thread (where handlers cannot be installed) signals keep their default
    action and the function always returns None. Processes forked inside the block inherit
    the handler; in them it restores the default action and re-raises, so a signal stops them
    at once and silently. (Data loader workers ignore both signals instead and leave the stop
    to their parent: :mod:`pipeline.lib.data`.)
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    owner = os.getpid()

    def handler(signum: int, _frame) -> None:
        if received or os.getpid() != owner:  # the second signal, or a forked child: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        print(f"\n{what}: {signal.Signals(signum).name} received: stopping after the current "
              "batch (send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
