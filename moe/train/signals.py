"""SIGTERM / SIGINT (a spot preemption notice, Ctrl-C): from the first instant of a run to its last.

Owns: what a stop signal does at each moment. Outside the loop (start-up: imports, data checks, compiling,
restoring; and after the last step) the signal raises `Preempted` at once: nothing is being trained, so
there is nothing to save and nothing is lost. Inside the loop (`deferred`) it only sets a flag: the loop
finishes the step in flight, saves it, and then raises `Preempted`. Either way train.py exits with 75.

One exception to "at once": a signal that lands while a module is being imported waits until that import has
finished (rechecked every RECHECK_S by SIGALRM). An exception raised inside an import can cross a C extension's
initialisation (jaxlib's nanobind module imports Python modules while it initialises): the import then fails
with ImportError, or the C++ side aborts the process (SIGABRT), instead of exiting 75.
"""

from __future__ import annotations

import contextlib
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RECHECK_S = 0.05  # a signal that lands inside an import is raised this long after it, or after the import ends


class Preempted(BaseException):
    """A stop signal ended the run; the message says when and whether a checkpoint was written. A
    BaseException, like KeyboardInterrupt: library code that catches Exception during start-up must not
    swallow it."""


_pending: list[str] = []  # signals _raise saw: one raised inside a weakref callback or __del__ is swallowed


def _startup_stop(name: str) -> Preempted:
    return Preempted(f"{name} outside the training loop (start-up or shut-down): no step was in flight, nothing "
                     "to save")


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (the chain of frames crosses C calls, a C extension's init too)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _raise(signum, frame):
    if signum != signal.SIGALRM:
        _pending.append(signal.Signals(signum).name)
    if _importing(frame):  # raising here could cross a C extension's init (see above): retry after it
        signal.signal(signal.SIGALRM, _raise)
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
        return
    raise _startup_stop(_pending[0])


def _quiet_unraisable(unraisable) -> None:
    """A `Preempted` raised where Python cannot propagate it (a gc callback, `__del__`, a weakref callback)
    is already in `_pending` and raised again by `deferred`: it is not an error, so it prints nothing (Python
    would print "Exception ignored in ..." with a traceback). Anything else goes to the previous hook."""
    if isinstance(unraisable.exc_value, Preempted):
        return
    _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def raise_on_signal() -> None:
    """Stop signals raise `Preempted` from now on (the entry points call this first)."""
    sys.unraisablehook = _quiet_unraisable
    for s in STOP_SIGNALS:
        signal.signal(s, _raise)


@contextlib.contextmanager
def deferred():
    """Inside: a stop signal appends its name to the yielded list instead of raising (the loop checks it
    after each step). On exit the previous handlers come back. A start-up signal whose exception Python
    swallowed (raised inside an import lock's weakref callback, say), or that still waits for an import to
    end, stops the run here, before any step."""
    if _pending:
        raise _startup_stop(_pending[0])
    seen: list[str] = []
    old = {s: signal.signal(s, lambda signum, _: seen.append(signal.Signals(signum).name)) for s in STOP_SIGNALS}
    try:
        yield seen
    finally:
        for s, h in old.items():
            signal.signal(s, h)
