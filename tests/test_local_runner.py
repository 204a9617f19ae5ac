"""The local runner's worker processes stop side by side (pipelines.local_runner)."""

from __future__ import annotations

import pytest
from apache_beam.runners.portability.fn_api_runner import worker_handlers as wh

from pipelines import local_runner
from pipelines.local_runner import tell_workers_to_stop, workers_stop_together


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


@pytest.fixture(autouse=True)
def _no_patch_left():
    yield
    assert local_runner._PATCH_USERS == 0
