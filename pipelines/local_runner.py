"""The local multi-process DirectRunner: its worker processes stop side by side.

When a pipeline is done, Beam's local runner closes its worker handlers one
after another (``WorkerHandlerManager.close_all``): it tells a worker to
stop, waits until the worker's process has exited, and only then tells the
next one. A GPU worker's exit (tearing down its DoFns, its interpreter and
its CUDA context) takes seconds, so four workers cost four of those in a
row after the last shard is written (BENCHMARKS.md: 10 s with four workers
on two GPUs). :func:`workers_stop_together` tells every worker to stop first
and then lets Beam wait for each as before, so they exit side by side.

It reaches into Beam's local runner (``apache_beam.runners.portability.
fn_api_runner.worker_handlers``); where those names are missing (another
Beam version) it changes nothing and the workers stop as Beam stops them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# one patch at a time, however many runs a process makes side by side
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL: Any = None


def _beam_names() -> tuple[Any, Any, Any, Any] | None:
    """Beam's manager class, control connection class, done marker and
    started state, or None where this Beam version lacks them."""
    try:
        from apache_beam.runners.portability.fn_api_runner import worker_handlers as wh

        names = (wh.WorkerHandlerManager, wh.ControlConnection,
                 wh.BeamFnControlServicer._DONE_MARKER, wh.BeamFnControlServicer.STARTED_STATE)
        if not callable(getattr(names[0], "close_all", None)):
            return None
        return names
    except (ImportError, AttributeError):
        return None


def tell_workers_to_stop(manager: Any) -> int:
    """Queue the end of the control stream for every started worker of
    ``manager`` (a ``WorkerHandlerManager``) without waiting for any; returns
    how many were told. Each worker then shuts down on its own; Beam's
    ``close_all`` afterwards finds them stopping (its own end marker queued
    behind ours is never read) and waits for each."""
    names = _beam_names()
    if names is None:
        return 0
    _, connection_cls, done, started = names
    told = 0
    for handlers in list(getattr(manager, "_cached_handlers", {}).values()):
        for handler in set(handlers):
            conn = getattr(handler, "control_conn", None)
            # in-process (embedded) handlers have no control stream to end
            if isinstance(conn, connection_cls) and getattr(conn, "_state", None) == started:
                conn.push(done)
                told += 1
    return told


def _close_all_together(self: Any) -> None:
    from pipelines.beam import trace

    original = _ORIGINAL
    told = 0
    try:
        told = tell_workers_to_stop(self)
    except Exception as exc:  # an optimisation only: Beam's own close follows
        log.debug("could not tell the workers to stop together (%s)", exc)
    trace("workers_stopping", told=told)
    original(self)
    trace("workers_stopped")


@contextlib.contextmanager
def workers_stop_together() -> Iterator[bool]:
    """While active, a local runner's worker processes stop side by side
    when its pipeline ends (see the module's docstring). Yields whether the
    change is in place (False where this Beam version lacks the names)."""
    global _PATCH_USERS, _ORIGINAL

    names = _beam_names()
    if names is None:
        yield False
        return
    manager_cls = names[0]
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            _ORIGINAL = manager_cls.close_all
            manager_cls.close_all = _close_all_together
        _PATCH_USERS += 1
    try:
        yield True
    finally:
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                manager_cls.close_all = _ORIGINAL
                _ORIGINAL = None
