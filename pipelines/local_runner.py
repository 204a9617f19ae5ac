"""The local multi-process DirectRunner: its worker processes stop side by side.

When a pipeline is done, Beam's local runner closes its worker handlers one
after another (``WorkerHandlerManager.close_all``): it tells a worker to
stop, waits until the worker's process has exited, and only then tells the
next one. A GPU worker's exit (tearing down its DoFns, its interpreter and
its CUDA context) takes seconds, so four workers cost four of those in a
row after the last shard is written (BENCHMARKS.md: 10 s with four workers
on two GPUs). :func:`workers_stop_together` tells every worker to stop first
and then lets Beam wait for each as before, so they exit side by side.

A worker's exit is then mostly its interpreter's and CUDA's teardown
(freeing every model's memory, one allocation at a time), seconds that
follow the last shard. While :func:`workers_stop_together` is active, the
worker processes it starts end with ``os._exit(0)`` once their interpreter
begins to exit normally (:func:`fast_exit_at_interpreter_exit`): their
shards are committed and Beam has their results by then. A worker exiting
on an error keeps the normal exit and its exit code.

It reaches into Beam's local runner (``apache_beam.runners.portability.
fn_api_runner.worker_handlers``); where those names are missing (another
Beam version) it changes nothing and the workers stop as Beam stops them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# one patch at a time, however many runs a process makes side by side
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINAL: Any = None
_ENV_BEFORE: str | None = None

#: Set by :func:`workers_stop_together` (to the launching process's id) for
#: the worker processes it starts: they end fast once done.
FAST_EXIT_ENV = "CONTROLSET_WORKER_FAST_EXIT"
#: How long the launcher waits for one worker process to exit before it
#: leaves the rest to Beam's own close.
EXIT_WAIT_S = 120.0
_FAST_EXIT_REGISTERED = False


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
    return len(_tell(manager))


def _tell(manager: Any) -> list[Any]:
    names = _beam_names()
    if names is None:
        return []
    _, connection_cls, done, started = names
    told = []
    for handlers in list(getattr(manager, "_cached_handlers", {}).values()):
        for handler in set(handlers):
            conn = getattr(handler, "control_conn", None)
            # in-process (embedded) handlers have no control stream to end
            if isinstance(conn, connection_cls) and getattr(conn, "_state", None) == started:
                conn.push(done)
                told.append(handler)
    return told


def _wait_for_exits(handlers: list[Any], since: float, timeout: float = EXIT_WAIT_S) -> None:
    """Wait for the told workers' processes to exit (a subprocess worker's
    handler runs its process on ``worker_thread``), tracing each; Beam's
    close afterwards finds them gone. The timeout only bounds this extra
    wait: Beam's own close waits as it always does."""
    from pipelines.beam import trace

    deadline = time.monotonic() + timeout
    for i, handler in enumerate(handlers):
        thread = getattr(handler, "worker_thread", None)
        if not isinstance(thread, threading.Thread) or thread.ident is None:  # never started
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            return
        trace("worker_exited", worker=i, seconds=round(time.perf_counter() - since, 3))


def _stopping_together(original: Any) -> Any:
    """A ``close_all`` that tells every worker to stop, waits for their
    processes, then runs Beam's own ``original`` (kept here rather than read
    from a global: a pipeline that took the patched method just before the
    last run restored Beam's still closes its workers)."""

    def close_all(self: Any) -> None:
        _close_all_together(self, original)

    return close_all


def _close_all_together(self: Any, original: Any) -> None:
    from pipelines.beam import trace

    told: list[Any] = []
    since = time.perf_counter()
    try:
        told = _tell(self)
    except Exception as exc:  # an optimisation only: Beam's own close follows
        log.debug("could not tell the workers to stop together (%s)", exc)
    trace("workers_stopping", told=len(told))
    _wait_for_exits(told, since)
    original(self)
    trace("workers_stopped")


@contextlib.contextmanager
def workers_stop_together() -> Iterator[bool]:
    """While active, a local runner's worker processes stop side by side
    when its pipeline ends (see the module's docstring). Yields whether the
    change is in place (False where this Beam version lacks the names)."""
    global _PATCH_USERS, _ORIGINAL, _ENV_BEFORE

    names = _beam_names()
    if names is None:
        yield False
        return
    manager_cls = names[0]
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            _ORIGINAL = manager_cls.close_all
            manager_cls.close_all = _stopping_together(_ORIGINAL)
            # worker processes inherit the environment when they start
            _ENV_BEFORE = os.environ.get(FAST_EXIT_ENV)
            os.environ[FAST_EXIT_ENV] = str(os.getpid())
        _PATCH_USERS += 1
    try:
        yield True
    finally:
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                manager_cls.close_all = _ORIGINAL
                _ORIGINAL = None
                if _ENV_BEFORE is None:
                    os.environ.pop(FAST_EXIT_ENV, None)
                else:
                    os.environ[FAST_EXIT_ENV] = _ENV_BEFORE


#: The module Beam's local runner starts its worker processes with.
BEAM_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"


def is_local_beam_worker() -> bool:
    """Whether this process is a Beam SDK worker started by a local run under
    :func:`workers_stop_together`: the variable names another process, this
    one runs Beam's worker module as its main, and has the control address
    Beam gives its workers. Any other process that inherited the variable
    (a child of the launcher or of a worker) is not one."""
    launcher = os.environ.get(FAST_EXIT_ENV)
    if not launcher or launcher == str(os.getpid()):
        return False
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(main_spec, "name", None) == BEAM_WORKER_MAIN \
        and bool(os.environ.get("CONTROL_API_SERVICE_DESCRIPTOR"))


def fast_exit_at_interpreter_exit() -> bool:
    """In a worker process of a local run under :func:`workers_stop_together`
    (:func:`is_local_beam_worker`), make the interpreter's exit end the
    process at once (``os._exit(0)`` after flushing logs and output),
    skipping the teardown of modules, CUDA and freed memory; returns whether
    it did. Idempotent. Called once the worker's own work is done (a DoFn's
    teardown). Beam's worker fails only by raising, and an exit on an
    uncaught error is left alone, with its traceback and exit code."""
    global _FAST_EXIT_REGISTERED

    if _FAST_EXIT_REGISTERED:
        return True
    if not is_local_beam_worker():
        return False
    # processes this worker starts from now on do not inherit it
    os.environ.pop(FAST_EXIT_ENV, None)
    with _PATCH_LOCK:
        if not _FAST_EXIT_REGISTERED:
            # registered late, so it runs before the handlers registered
            # earlier (those of torch and the rest are what it skips)
            atexit.register(_exit_now)
            _FAST_EXIT_REGISTERED = True
    return True


def _exit_now() -> None:
    if getattr(sys, "last_type", None) is not None:
        return  # exiting on an uncaught error: keep the normal exit and its code
    # nothing is imported this late (the interpreter refuses new threads'
    # exit hooks): a worker that ran shards has the tracing module already
    beam = sys.modules.get("pipelines.beam")
    if beam is not None:
        try:
            beam.trace("process_exit", fast=True)
        except Exception:  # the timeline is optional; the exit is not
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream has nothing left to flush
            pass
    os._exit(0)
