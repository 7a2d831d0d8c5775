"""The catalog down mid-run: no document is lost (corrflow.catalog.spool), on the production path.

A real Tiled server on PostgreSQL is killed (SIGKILL) while ``flows.acquire.run_tomography`` is
acquiring, and started again on the same port and databases a few seconds later. The acquisition
goes on, the run's documents are spooled on local disk, and once the server answers the run is
replayed: the catalog then holds exactly the documents emitted. A catalog that stays down fails
the acquisition with its address and the spool file named, and ``corrflow catalog replay`` writes
the run later.
"""

from __future__ import annotations

import threading
import time

import pytest
from facility_helpers import drop_test_databases, production_test_settings

from corrflow.acquisition.cancellation import registered_engines
from corrflow.catalog.spool import CatalogUnavailableError, read_spool_file, spooled_runs
from corrflow.catalog.tiled import open_catalog
from corrflow.flows.acquire import run_tomography
from corrflow.flows.models import DEFAULT_SAMPLE
from corrflow.plans.requests import TomoScanRequest

pytestmark = pytest.mark.slow

SCAN = TomoScanRequest(num_projections=50, exposure_s=0.05, num_darks=2, num_flats=3)


@pytest.fixture
def server(tmp_path):
    from corrflow.operations.server import production_settings, start_tiled_server

    settings = production_test_settings(tmp_path, auth="off")
    settings.ensure_directories()
    state = {"proc": start_tiled_server(settings)}

    def restart() -> None:
        state["proc"] = start_tiled_server(settings)

    try:
        yield production_settings(settings).model_copy(deep=True), state, restart
    finally:
        state["proc"].stop()
        drop_test_databases(settings)


def _kill_catalog_at_projection(state, point: int) -> dict[str, float]:
    """From a thread: find the production RunEngine and kill the catalog server at ``point``."""
    seen: dict[str, float] = {}

    before = {id(engine) for engine in registered_engines()}

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (new := [e for e in registered_engines() if id(e) not in before]):
            time.sleep(0.01)
        (engine,) = new
        streams: dict[str, str] = {}

        def at_point(name, doc):
            if name == "stop":
                seen["stopped"] = time.time()
            if name == "descriptor":
                streams[doc["uid"]] = doc["name"]
            if name == "event" and streams.get(doc["descriptor"]) == "primary" and doc["seq_num"] == point and "killed" not in seen:
                state["proc"].kill()
                seen["killed"] = time.time()

        engine.subscribe(at_point)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def _documents_by_kind(documents):
    counts: dict[str, int] = {}
    for name, doc in documents:
        if name == "event_page":
            counts["event"] = counts.get("event", 0) + len(doc["seq_num"])
        else:
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.fault("catalog down")
def test_a_catalog_killed_mid_scan_and_restarted_loses_no_document(server, monkeypatch, fault_figures):
    settings, state, restart = server
    # Keep a copy of every spool file before the replay removes it: what the writer was given.
    import corrflow.catalog.spool as spool

    spooled: dict[str, list] = {}
    replay = spool.replay_spool_file

    def keep_then_replay(path, catalog_runs, writer):
        spooled[path.stem] = list(read_spool_file(path))
        return replay(path, catalog_runs, writer)

    monkeypatch.setattr(spool, "replay_spool_file", keep_then_replay)
    seen = _kill_catalog_at_projection(state, 10)

    def restart_after_the_scan() -> None:
        # Back only after the run has stopped, so the catalog surely missed documents (the writer
        # batches events: a short outage between two batches loses nothing even without the spool).
        while "stopped" not in seen:
            time.sleep(0.05)
        time.sleep(1.0)
        restart()
        seen["back"] = time.time()

    threading.Thread(target=restart_after_the_scan, daemon=True).start()
    sample = DEFAULT_SAMPLE.model_copy(update={"name": "outage-01"})
    acquired = run_tomography(settings, sample, SCAN)

    assert "killed" in seen and "back" in seen
    (documents,) = spooled.values()
    emitted = _documents_by_kind(documents)
    with open_catalog(settings) as catalog:
        run = catalog.runs[acquired.run_uid]
        stored = _documents_by_kind(run.documents())
        stop = run.metadata["stop"]
        images = run["primary"]["xray_detector_image"].read()
    assert stop["exit_status"] == "success", stop
    assert emitted["event"] == SCAN.n_frames and stored["event"] == emitted["event"]
    kinds = ("start", "descriptor", "event", "stream_resource", "stop")
    assert {k: stored.get(k, 0) for k in kinds} == {k: emitted.get(k, 0) for k in kinds}
    assert stored["start"] == stored["stop"] == 1
    assert images.shape[0] == SCAN.num_projections, "every frame readable through the replayed run"
    assert acquired.nxtomo.local_path(settings).is_file(), "exported from the replayed run"
    assert not spooled_runs(settings.spool_dir), "the replayed spool file is removed"
    fault_figures["catalog down (s)"] = round(seen["back"] - seen["killed"], 1)
    fault_figures["events emitted"] = emitted["event"]
    fault_figures["events stored"] = stored["event"]
    print(
        f"catalog down {seen['back'] - seen['killed']:.1f} s at projection 10 of {SCAN.num_projections}: "
        f"{emitted['event']} events emitted, {stored['event']} stored; "
        f"{sum(emitted.values())} documents spooled and replayed"
    )


@pytest.mark.fault("catalog down")
def test_a_catalog_that_stays_down_fails_the_scan_naming_it_and_the_spool_which_replay_writes_later(server):
    from typer.testing import CliRunner

    from corrflow.cli.app import app

    settings, state, restart = server
    settings = settings.model_copy(update={"catalog": settings.catalog.model_copy(update={"outage_wait_s": 2.0})})
    _kill_catalog_at_projection(state, 10)
    sample = DEFAULT_SAMPLE.model_copy(update={"name": "outage-02"})
    with pytest.raises(CatalogUnavailableError) as raised:
        run_tomography(settings, sample, SCAN)
    message = str(raised.value)
    (path,) = spooled_runs(settings.spool_dir)
    assert settings.catalog.url in message and str(path) in message and "corrflow catalog replay" in message
    assert not list(settings.beamline_storage.rglob("outage-02_*_nxtomo.nxs")), "nothing exported as good"
    documents = list(read_spool_file(path))
    assert documents[-1][0] == "stop" and documents[-1][1]["exit_status"] == "success"

    restart()
    environment = {"CORRFLOW_DATA_ROOT": str(settings.data_root), "CORRFLOW_CATALOG__URL": settings.catalog.url}
    if settings.catalog.api_key:
        environment["CORRFLOW_CATALOG__API_KEY"] = settings.catalog.api_key.get_secret_value()
    result = CliRunner().invoke(app, ["catalog", "replay"], env=environment)
    assert result.exit_code == 0, result.output
    assert path.stem in result.output
    with open_catalog(settings) as catalog:
        run = catalog.runs[path.stem]
        assert run.metadata["stop"]["exit_status"] == "success"
        assert _documents_by_kind(run.documents())["event"] == SCAN.n_frames
    assert not path.exists()
