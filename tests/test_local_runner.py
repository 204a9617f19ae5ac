"""The local runner's worker processes stop side by side (pipelines.local_runner)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from apache_beam.runners.portability.fn_api_runner import worker_handlers as wh

from pipelines import local_runner
from pipelines.local_runner import FAST_EXIT_ENV, fast_exit_at_interpreter_exit, tell_workers_to_stop, \
    workers_stop_together

ROOT = Path(__file__).resolve().parents[1]


class _Handler:
    def __init__(self, conn):
        self.control_conn = conn


def _started() -> wh.ControlConnection:
    conn = wh.ControlConnection()
    conn._state = wh.BeamFnControlServicer.STARTED_STATE  # as once its worker connected
    return conn


class _Manager:
    def __init__(self, handlers):
        self._cached_handlers = {"env": handlers}


def test_every_started_worker_is_told_to_stop_without_waiting():
    a, b = _started(), _started()
    idle = wh.ControlConnection()  # never connected: nothing to end
    ha = _Handler(a)
    handlers = [ha, _Handler(b), ha, _Handler(idle), _Handler(object())]
    assert tell_workers_to_stop(_Manager(handlers)) == 2
    # the end marker is queued for each started worker, once (a handler
    # listed twice is one worker), and for no other
    for conn in (a, b):
        assert conn.get_req() is wh.BeamFnControlServicer._DONE_MARKER
        assert conn._push_queue.empty()
    assert idle._push_queue.empty()


def test_the_patch_is_in_place_only_while_a_run_needs_it():
    beams = wh.WorkerHandlerManager.close_all
    with workers_stop_together() as active:
        assert active
        assert wh.WorkerHandlerManager.close_all is not beams
        with workers_stop_together():  # a second run side by side
            pass
        assert wh.WorkerHandlerManager.close_all is not beams  # the first still runs
    assert wh.WorkerHandlerManager.close_all is beams


def test_close_all_tells_every_worker_before_beams_own_close(monkeypatch):
    a, b = _started(), _started()
    seen = []

    def beams_close_all(manager):
        # by the time Beam closes the first worker, both have their end marker
        seen.append([not c._push_queue.empty() for c in (a, b)])

    monkeypatch.setattr(wh.WorkerHandlerManager, "close_all", beams_close_all)
    with workers_stop_together():
        wh.WorkerHandlerManager.close_all(_Manager([_Handler(a), _Handler(b)]))
    assert seen == [[True, True]]
    assert wh.WorkerHandlerManager.close_all is beams_close_all


def test_another_beam_version_is_left_alone(monkeypatch):
    monkeypatch.delattr(wh.BeamFnControlServicer, "_DONE_MARKER")
    beams = wh.WorkerHandlerManager.close_all
    with workers_stop_together() as active:
        assert not active
        assert wh.WorkerHandlerManager.close_all is beams
    assert tell_workers_to_stop(_Manager([_Handler(_started())])) == 0


def test_close_all_waits_for_the_told_workers_processes(monkeypatch, tmp_path):
    """Between telling and Beam's own close, the launcher waits for each
    told worker's process (its handler's worker thread) and traces it."""
    import json

    import pipelines.beam as pb

    monkeypatch.setattr(pb, "_TRACE_FAILED", False)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("CONTROLSET_TRACE", str(trace))
    a, b = _started(), _started()
    ha, hb = _Handler(a), _Handler(b)
    ends = []
    for h, conn in ((ha, a), (hb, b)):
        # a worker "process" that exits once it reads its end marker
        h.worker_thread = threading.Thread(target=lambda c=conn: ends.append(c.get_req()))
        h.worker_thread.start()
    seen = []
    monkeypatch.setattr(wh.WorkerHandlerManager, "close_all",
                        lambda manager: seen.append([h.worker_thread.is_alive() for h in (ha, hb)]))
    with workers_stop_together():
        wh.WorkerHandlerManager.close_all(_Manager([ha, hb, _Handler(object())]))
    assert seen == [[False, False]]
    assert ends == [wh.BeamFnControlServicer._DONE_MARKER] * 2
    events = [json.loads(line)["event"] for line in trace.read_text().splitlines()]
    assert events == ["workers_stopping", "worker_exited", "worker_exited", "workers_stopped"]


def test_fast_exit_only_in_workers_started_under_the_patch(monkeypatch):
    monkeypatch.delenv(FAST_EXIT_ENV, raising=False)
    assert not fast_exit_at_interpreter_exit()
    with workers_stop_together():
        assert os.environ[FAST_EXIT_ENV] == str(os.getpid())
        assert not fast_exit_at_interpreter_exit()  # the launching process itself
    assert FAST_EXIT_ENV not in os.environ


_WORKER = textwrap.dedent("""
    import atexit, importlib.machinery, os, pathlib, sys
    import __main__
    from pipelines.local_runner import BEAM_WORKER_MAIN, FAST_EXIT_ENV, fast_exit_at_interpreter_exit
    marker, outcome = sys.argv[1], sys.argv[2]
    if outcome != "not_a_worker":
        # as Beam's local runner starts a worker: `python -m <its worker module>`
        # with the control address in the environment
        __main__.__spec__ = importlib.machinery.ModuleSpec(BEAM_WORKER_MAIN, None)
        os.environ["CONTROL_API_SERVICE_DESCRIPTOR"] = "url: 'localhost:1'"
    # registered first, so it would run after the fast exit's handler
    atexit.register(lambda: pathlib.Path(marker).write_text("teardown ran"))
    print("registered", fast_exit_at_interpreter_exit(), flush=True)
    print("inherited", FAST_EXIT_ENV in os.environ)
    print("output before the exit")
    if outcome == "fail":
        raise ValueError("the worker failed")
    if outcome == "not_a_worker":
        raise SystemExit(3)
""")


@pytest.mark.parametrize("outcome", ["ok", "fail", "not_a_worker"])
def test_a_worker_ends_fast_only_when_it_exits_cleanly(outcome, tmp_path):
    """A Beam worker process of a local run (the variable set to another
    process's id) skips the rest of the interpreter's teardown when it exits
    normally, with exit code 0 and its output flushed, and its own children
    no longer inherit the variable; exiting on an error keeps the teardown,
    the traceback and exit code 1. Another process that inherited the
    variable is left alone (here: its SystemExit(3) keeps code 3)."""
    marker = tmp_path / "teardown"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{FAST_EXIT_ENV: "1"})
    env.pop("CONTROLSET_TRACE", None)
    env.pop("CONTROL_API_SERVICE_DESCRIPTOR", None)
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(marker), outcome], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "output before the exit" in proc.stdout
    if outcome == "not_a_worker":
        assert "registered False" in proc.stdout and "inherited True" in proc.stdout
        assert proc.returncode == 3
        assert marker.read_text() == "teardown ran"
        return
    assert "registered True" in proc.stdout and "inherited False" in proc.stdout
    if outcome == "ok":
        assert proc.returncode == 0, proc.stderr
        assert not marker.exists()
    else:
        assert proc.returncode == 1
        assert "ValueError: the worker failed" in proc.stderr
        assert marker.read_text() == "teardown ran"


@pytest.fixture(autouse=True)
def _no_patch_left():
    yield
    assert local_runner._PATCH_USERS == 0
