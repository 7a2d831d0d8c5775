"""Catalog entries left without a stop document by a dead acquisition process get one: ``fail``,
with the reason, and nothing else of the run changes (in-process catalog; Prefect states injected).
The same with real workers killed mid-flow: tests/test_chain_crash.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from event_model import compose_run

from corrflow.catalog.tiled import Catalog, open_catalog
from corrflow.catalog.reconcile import reconcile_runs
from corrflow.config.settings import Settings, load_settings

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Catalog]]:
    settings = load_settings(data_root=tmp_path_factory.mktemp("reconcile"))
    settings.ensure_directories()
    with open_catalog(settings) as catalog:
        yield settings, catalog


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _plant_run(cat: Catalog, *, instrument: str = "sim-tomo", producer: dict | None, age_s: float = 600.0, events: int = 3) -> str:
    """A run as a process that died mid-acquisition leaves it: start, events, no stop."""
    from bluesky_tiled_plugins import TiledWriter

    writer = TiledWriter(cat.runs, batch_size=1)  # every event reaches the catalog at once
    metadata = {"identification": {"instrument": instrument, "sample_name": "lost-01"}}
    if producer is not None:
        metadata["producer"] = producer
    bundle = compose_run(metadata=metadata, time=time.time() - age_s)
    writer("start", bundle.start_doc)
    descriptor = bundle.compose_descriptor(
        name="primary", data_keys={"angle": {"dtype": "number", "shape": [], "source": "test", "units": "deg"}}
    )
    writer("descriptor", descriptor.descriptor_doc)
    for k in range(events):
        writer("event", descriptor.compose_event(data={"angle": 10.0 * k}, timestamps={"angle": time.time()}, seq_num=k + 1))
    return bundle.start_doc["uid"]


def _states(mapping: dict[str, tuple[str, str] | None]):
    asked: list[str] = []

    def state(flow_run_id: str):
        asked.append(flow_run_id)
        return mapping.get(flow_run_id)

    return state, asked


def test_a_crashed_acquisitions_entry_is_closed_as_failed_and_its_events_stay(catalog):
    _, cat = catalog
    flow_run_id = str(uuid.uuid4())
    uid = _plant_run(cat, producer={"host": "beamline-ws", "pid": 4242, "flow_run_id": flow_run_id})
    before = dict(cat.runs[uid].metadata)
    angles = np.asarray(cat.runs[uid]["primary"]["angle"].read())
    state, asked = _states({flow_run_id: ("CRASHED", "Crashed")})

    started = time.perf_counter()
    entries = reconcile_runs(cat, instrument="sim-tomo", flow_run_state=state)
    print(f"reconcile: {len(entries)} open run(s) in {time.perf_counter() - started:.3f} s")

    (entry,) = [e for e in entries if e.uid == uid]
    assert entry.action == "closed" and asked == [flow_run_id]
    run = cat.runs[uid]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail" and stop["run_start"] == uid
    assert stop["reason"] == f"acquisition process lost (flow run {flow_run_id} Crashed)"
    assert stop["num_events"] == {"primary": 3}
    # Nothing of what was acquired changed; the start document is as it was.
    assert run.metadata["start"] == before["start"]
    np.testing.assert_array_equal(np.asarray(run["primary"]["angle"].read()), angles)
    assert np.asarray(run["primary"]["seq_num"].read()).tolist() == [1, 2, 3]
    # Closed once: a second pass finds nothing left to do for it.
    assert uid not in {e.uid for e in reconcile_runs(cat, flow_run_state=state)}


@pytest.mark.parametrize(
    ("state_type", "state_name"), [("FAILED", "Failed"), ("CANCELLED", "Cancelled"), ("COMPLETED", "Completed")]
)
def test_every_final_flow_run_state_means_the_producer_is_gone(catalog, state_type, state_name):
    _, cat = catalog
    flow_run_id = str(uuid.uuid4())
    uid = _plant_run(cat, producer={"host": "beamline-ws", "pid": 1, "flow_run_id": flow_run_id})
    state, _ = _states({flow_run_id: (state_type, state_name)})
    (entry,) = [e for e in reconcile_runs(cat, flow_run_state=state) if e.uid == uid]
    assert entry.action == "closed" and entry.reason.endswith(f"{flow_run_id} {state_name})")


def test_runs_whose_producer_may_live_are_kept_and_said_why(catalog):
    _, cat = catalog
    running = str(uuid.uuid4())
    alive = _plant_run(cat, producer={"host": HOST, "pid": subprocess.os.getpid(), "flow_run_id": running})
    young = _plant_run(cat, producer={"host": HOST, "pid": _dead_pid()}, age_s=5.0)
    remote = _plant_run(cat, producer={"host": "elsewhere", "pid": 17})
    legacy = _plant_run(cat, producer=None)
    other_instrument = _plant_run(cat, instrument="sim-sem", producer={"host": HOST, "pid": _dead_pid()})
    state, _ = _states({running: ("RUNNING", "Running")})

    entries = {e.uid: e for e in reconcile_runs(cat, instrument="sim-tomo", flow_run_state=state)}
    assert other_instrument not in entries
    assert entries[alive].action == "kept" and "Running" in entries[alive].reason
    assert entries[young].action == "kept" and "grace" in entries[young].reason
    assert entries[remote].action == "kept" and "cannot be checked" in entries[remote].reason
    assert entries[legacy].action == "kept" and "no producer recorded" in entries[legacy].reason
    for uid in (alive, young, remote, legacy):
        assert "stop" not in cat.runs[uid].metadata

    # A dry run says what it would do and writes nothing; the age limit closes the unverifiable ones.
    dry = {e.uid: e for e in reconcile_runs(cat, instrument="sim-tomo", unverifiable_after_s=300.0, dry_run=True, flow_run_state=state)}
    assert dry[remote].action == dry[legacy].action == "would close"
    assert "stop" not in cat.runs[remote].metadata
    closed = {e.uid: e for e in reconcile_runs(cat, instrument="sim-tomo", unverifiable_after_s=300.0, flow_run_state=state)}
    assert closed[remote].action == closed[legacy].action == "closed"
    assert cat.runs[remote].metadata["stop"]["exit_status"] == "fail"
    assert closed[alive].action == "kept"


def test_a_run_whose_local_process_is_gone_is_closed_without_asking_prefect(catalog):
    _, cat = catalog
    pid = _dead_pid()
    uid = _plant_run(cat, instrument="sim-local", producer={"host": HOST, "pid": pid})
    state, asked = _states({})
    (entry,) = reconcile_runs(cat, instrument="sim-local", flow_run_state=state)
    assert entry.action == "closed" and entry.reason == f"acquisition process lost (process {pid} on {HOST} is gone)"
    assert asked == []


def test_reconcile_time_for_twenty_open_runs(catalog):
    _, cat = catalog
    pid = _dead_pid()
    uids = [_plant_run(cat, instrument="sim-bench", producer={"host": HOST, "pid": pid}, events=1) for _ in range(20)]
    started = time.perf_counter()
    entries = reconcile_runs(cat, instrument="sim-bench", flow_run_state=lambda _: None)
    seconds = time.perf_counter() - started
    assert sorted(e.uid for e in entries if e.action == "closed") == sorted(uids)
    started = time.perf_counter()
    assert reconcile_runs(cat, instrument="sim-bench", flow_run_state=lambda _: None) == []
    idle_s = time.perf_counter() - started
    print(f"reconcile: 20 runs closed in {seconds:.2f} s ({1000 * seconds / 20:.0f} ms/run); nothing to do: {1000 * idle_s:.0f} ms")


def test_the_cli_reports_and_closes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from corrflow.cli import app

    for key in list(subprocess.os.environ):
        if key.startswith("CORRFLOW_"):
            monkeypatch.delenv(key)
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    pid = _dead_pid()
    with open_catalog(settings) as cat:
        uid = _plant_run(cat, producer={"host": HOST, "pid": pid})
    runner = CliRunner()
    dry = runner.invoke(app, ["catalog", "reconcile", "--data-root", str(tmp_path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert [json.loads(line)["action"] for line in dry.stdout.splitlines()] == ["would close"]
    done = runner.invoke(app, ["catalog", "reconcile", "--data-root", str(tmp_path), "--instrument", "sim-tomo"])
    assert done.exit_code == 0, done.output
    (line,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert line["uid"] == uid and line["action"] == "closed" and f"process {pid}" in line["reason"]
    with open_catalog(settings) as cat:
        assert cat.runs[uid].metadata["stop"]["exit_status"] == "fail"


def test_an_acquisition_closes_its_instruments_lost_runs_before_it_starts(tmp_path, monkeypatch):
    from corrflow.flows.acquire import run_tomography
    from corrflow.flows.models import DEFAULT_SAMPLE
    from corrflow.plans import TomoScanRequest

    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    with open_catalog(settings) as cat:
        lost = _plant_run(cat, producer={"host": HOST, "pid": _dead_pid()})
        other = _plant_run(cat, instrument="sim-sem", producer={"host": HOST, "pid": _dead_pid()})
    result = run_tomography(
        settings,
        DEFAULT_SAMPLE.model_copy(update={"name": "after-crash"}),
        TomoScanRequest(num_projections=4, exposure_s=0.05, num_darks=1, num_flats=1, flat_offset_x_um=2000.0),
    )
    with open_catalog(settings) as cat:
        assert cat.runs[lost].metadata["stop"]["exit_status"] == "fail"
        assert "stop" not in cat.runs[other].metadata  # another instrument's runs are its own business
        assert cat.runs[result.run_uid].metadata["stop"]["exit_status"] == "success"
        assert cat.runs[result.run_uid].metadata["start"]["producer"]["host"] == HOST


def test_finished_runs_are_never_listed_dry_run_included(catalog):
    _, cat = catalog
    finished = _plant_run(cat, instrument="sim-finished", producer={"host": HOST, "pid": _dead_pid()})
    cat.runs[finished].update_metadata(metadata={"stop": {"exit_status": "success", "uid": "s", "run_start": finished}})
    still_open = _plant_run(cat, instrument="sim-finished", producer={"host": HOST, "pid": _dead_pid()})
    entries = reconcile_runs(cat, instrument="sim-finished", dry_run=True, flow_run_state=lambda _: None)
    assert [(e.uid, e.action) for e in entries] == [(still_open, "would close")]
