"""Honest records: the catalog says ``success`` only for a run that took every point its plan declared.

A bluesky ``stop`` (a paused scan stopped by an operator) ends a run with ``exit_status="success"``
whatever it took; the production RunEngine's catalog path (:class:`CompletenessCheck` behind the
resume filter) records such a run as ``fail``, naming each short stream.
"""

from __future__ import annotations

import threading

import pytest
from bluesky.utils import RunEngineInterrupted

from corrflow.acquisition.runengine import make_run_engine
from corrflow.catalog.filters import CompletenessCheck
from corrflow.catalog.tiled import open_catalog, tiled_writer
from corrflow.config.settings import load_settings
from corrflow.devices.beamline import build_beamline
from corrflow.devices.sem import build_microscope
from corrflow.flows.acquire import AcquisitionError, _check_success
from corrflow.plans import micrograph, tomo_scan
from corrflow.simulators import SimulatedWorld

SAMPLE = {"name": "honest-01", "proposal": "P-2026-001", "user": "ada"}


def _documents(*, planned: dict[str, int], taken: dict[str, int], exit_status: str = "success", reason: str = ""):
    yield "start", {"uid": "run-1", "time": 0.0, "planned_events": planned}
    seq = 0
    for k, (stream, n) in enumerate(taken.items()):
        yield "descriptor", {"uid": f"d{k}", "run_start": "run-1", "name": stream, "data_keys": {}, "time": 0.0}
        for i in range(1, n + 1):
            seq += 1
            yield "event", {"uid": f"e{seq}", "descriptor": f"d{k}", "seq_num": i, "data": {}, "timestamps": {}, "time": 0.0}
    yield "stop", {"uid": "stop-1", "run_start": "run-1", "exit_status": exit_status, "reason": reason, "time": 1.0}


def _through_check(documents):
    received = []
    check = CompletenessCheck(lambda name, doc: received.append((name, doc)))
    for name, doc in documents:
        check(name, doc)
    return check, received[-1][1]


def test_a_run_short_of_its_plan_is_recorded_as_failed_naming_each_short_stream():
    check, stop = _through_check(_documents(planned={"dark": 2, "flat": 2, "primary": 10}, taken={"dark": 2, "flat": 1, "primary": 4}))
    assert stop["exit_status"] == "fail"
    assert stop["reason"] == "incomplete run: flat: 1 of 2 planned events taken; primary: 4 of 10 planned events taken"
    assert check.incomplete == {"run-1": stop["reason"].removeprefix("incomplete run: ")}


def test_a_complete_run_and_a_run_without_a_plan_pass_unchanged():
    _, stop = _through_check(_documents(planned={"primary": 3}, taken={"primary": 3}))
    assert stop["exit_status"] == "success" and stop["reason"] == ""
    documents = list(_documents(planned={}, taken={"primary": 1}))
    _, stop = _through_check(documents)
    assert stop["exit_status"] == "success"


def test_an_aborted_run_keeps_its_status_and_gets_the_count_in_its_reason():
    _, stop = _through_check(_documents(planned={"primary": 5}, taken={"primary": 2}, exit_status="abort", reason="cancelled"))
    assert stop["exit_status"] == "abort"
    assert stop["reason"] == "cancelled; primary: 2 of 5 planned events taken"


def test_a_re_taken_event_counts_once():
    documents = list(_documents(planned={"primary": 3}, taken={"primary": 2}))
    stop = documents.pop()
    documents.append(documents[-1])  # event seq_num 2 again (a resume)
    documents.append(stop)
    _, stop = _through_check(documents)
    assert stop["exit_status"] == "fail" and "2 of 3" in stop["reason"]


@pytest.fixture
def catalogued(tmp_path):
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    with open_catalog(settings) as catalog:
        yield settings, catalog


@pytest.mark.fault("stopped scan recorded as success")
def test_a_stopped_scan_is_catalogued_failed_by_the_production_run_engine(catalogued):
    """An operator pauses the scan at projection 3 of 8 and stops it: bluesky says 'success'."""
    settings, catalog = catalogued
    beamline = build_beamline(settings, SimulatedWorld(settings.simulation))
    streams: dict[str, str] = {}
    emitted = []

    def pause_at_third_projection(name, doc):
        emitted.append((name, doc))
        if name == "descriptor":
            streams[doc["uid"]] = doc["name"]
        if name == "event" and streams[doc["descriptor"]] == "primary" and doc["seq_num"] == 3:
            threading.Thread(target=engine.request_pause, daemon=True).start()

    engine = make_run_engine(pause_at_third_projection, catalog_writer=tiled_writer(catalog.runs, settings), instrument=beamline)
    plan = tomo_scan(beamline, num_projections=8, exposure_s=0.05, num_darks=1, num_flats=1, sample=SAMPLE)
    with pytest.raises(RunEngineInterrupted):
        engine(plan)
    engine.stop()
    assert emitted[-1][1]["exit_status"] == "success", "bluesky's own stop document says success"
    (uid,) = [doc["uid"] for name, doc in emitted if name == "start"]
    stop = catalog.runs[uid].metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert "primary: " in stop["reason"] and " of 8 planned events taken" in stop["reason"]
    with pytest.raises(AcquisitionError, match="of 8 planned events taken"):
        _check_success(catalog.runs[uid])


def test_every_production_plan_declares_what_it_takes_and_a_full_run_is_a_success(catalogued):
    settings, catalog = catalogued
    world = SimulatedWorld(settings.simulation)
    beamline, microscope = build_beamline(settings, world), build_microscope(settings, world)
    plans = {
        "tomo_scan": (beamline, tomo_scan(beamline, num_projections=4, exposure_s=0.01, num_darks=1, num_flats=2, sample=SAMPLE)),
        "micrograph": (microscope, micrograph(microscope, sample=SAMPLE)),
    }
    for name, (instrument, plan) in plans.items():
        engine = make_run_engine(catalog_writer=tiled_writer(catalog.runs, settings), instrument=instrument)
        (uid,) = engine(plan)
        run = catalog.runs[uid]
        assert run.metadata["start"]["planned_events"], name
        assert run.metadata["stop"]["exit_status"] == "success", (name, run.metadata["stop"])
