"""Chaining across facilities through a real Prefect server on PostgreSQL.

* ten parallel triggers of one site's part of a chain create exactly one flow run (idempotency keys);
* the whole chain as deployed, started from the beamline's experiment queue: tomography on the
  beamline pool -> transfer + reconstruction on the compute pool -> volume copied to the microscope
  site, micrograph, registration against that copy, ROI hand-off and report on the microscope pool,
  with three process workers (one per site) and a Tiled server on PostgreSQL; the catalog then holds
  every product linked to its parents (slow: real processes, ~3 min on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import contextvars
import threading
import time
import uuid

import pytest
from facility_helpers import SharedFacility

from corrflow.flows.models import ExperimentRequest, Sample, StoredFile, TomographyRun
from corrflow.flows.pipeline import ChainProducts, idempotency_key, trigger_site


@pytest.fixture(scope="module")
def facility(request):
    facility = SharedFacility.get(request.config)
    facility.bootstrap()
    with facility.client():
        yield facility


async def _runs_with_tag(tag: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


async def _delete_runs(runs) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for run in runs:
            await client.delete_flow_run(run.id)


@pytest.mark.fault("double trigger")
def test_ten_parallel_triggers_of_one_site_create_exactly_one_flow_run(facility):
    run_uid = f"test-{uuid.uuid4()}"
    request = ExperimentRequest(sample=Sample(name="idem-01"))
    nxtomo = StoredFile(site="beamline", path="x/a.nxs")
    products = ChainProducts(tomography=TomographyRun(run_uid=run_uid, instrument="sim-tomo", files=(nxtomo,), nxtomo=nxtomo))
    barrier = threading.Barrier(10)
    ids, errors = [], []

    def trigger() -> None:
        barrier.wait()  # all ten hit the server together
        try:
            ids.append(trigger_site("compute", request, products).id)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    # Each thread runs in a copy of this context: it carries the Prefect settings (API URL).
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(trigger,)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    runs = asyncio.run(_runs_with_tag(f"run:{run_uid}"))
    try:
        assert not errors, errors
        assert len(ids) == 10 and len(set(ids)) == 1
        assert [r.id for r in runs] == [ids[0]]
        assert runs[0].idempotency_key == idempotency_key(run_uid, "compute")
        assert runs[0].name == "compute · idem-01 · transfer + reconstruction"
        assert {f"run:{run_uid}", "site:compute"} <= set(runs[0].tags)
        assert runs[0].state.is_scheduled()
    finally:
        # No worker may pick up this run with its made-up files later: delete it.
        asyncio.run(_delete_runs(runs))


async def _runs_of(deployment_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    flow_name, name = deployment_name.split("/")
    async with get_client() as client:
        runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        flows = {f.id: f.name for f in await client.read_flows()}
    return [r for r in runs if flows.get(r.flow_id) == flow_name]


def _wait_for_completed(deployment_name: str, workers, *, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = asyncio.run(_runs_of(deployment_name))
        for run in runs:
            if run.state.is_final() and not run.state.is_completed():
                logs = "\n\n".join(f"--- {w.name}\n{w.log_tail(60)}" for w in workers)
                pytest.fail(f"{deployment_name}: run {run.name} ended {run.state.type.value}: {run.state.message}\n{logs}")
        done = [r for r in runs if r.state.is_completed()]
        if done:
            return done
        time.sleep(1.0)
    logs = "\n\n".join(f"--- {w.name}\n{w.log_tail(60)}" for w in workers)
    pytest.fail(f"{deployment_name}: no completed run within {timeout_s:.0f} s\n{logs}")


async def _runs_named(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


@pytest.mark.slow
def test_full_chain_from_the_queue_through_three_site_workers_and_tiled_on_postgresql(facility):
    """Submit to the beamline's queue only; the dispatcher, the compute and the microscope parts of
    the chain must follow by themselves, each on its own site's worker, and the catalog must then
    hold every product of the chain linked to its parents."""
    from pathlib import Path

    from tiled.client import from_uri

    from corrflow.config.settings import secret_value

    from corrflow.catalog.tiled import plain
    from corrflow.flows.experiment_queue import submit_experiment
    from corrflow.operations.queue import ExperimentQueue
    from corrflow.operations.server import production_settings, start_worker
    from corrflow.config.settings import SITES
    from corrflow.formats.checksums import sha256_file

    facility.ensure_tiled()
    settings = production_settings(facility.settings)
    workers = [start_worker(facility.settings, site) for site in SITES]
    try:
        entry = submit_experiment(
            settings,
            plan="tomography",
            parameters={"tomography": {"num_projections": 90}},
            sample={"name": "chain-01", "proposal": "it-0001", "user": "it-user"},
            priority=5,
        )  # wakes dispatch-queue/beamline on the beamline pool
        _wait_for_completed("dispatch-queue/beamline", workers, timeout_s=300)
        (compute_run,) = _wait_for_completed("correlative-chain/compute", workers, timeout_s=300)
        (micro_run,) = _wait_for_completed("correlative-chain/microscope", workers, timeout_s=300)
    finally:
        for worker in workers:
            worker.stop()

    assert ExperimentQueue.from_settings(settings).get(entry.id).state == "completed"
    (tomo_run,) = asyncio.run(_runs_named(f"{settings.beamline.name} · chain-01 · tomography"))
    assert tomo_run.state.is_completed()  # ran as a sub-flow of the dispatcher, holding the slot
    assert compute_run.name == "compute · chain-01 · transfer + reconstruction"
    assert micro_run.name == "sim-sem · chain-01 · volume to the microscope + micrograph + registration + ROI hand-off + report"
    products = micro_run.parameters["products"]
    run_uid = products["tomography"]["run_uid"]
    assert compute_run.idempotency_key == idempotency_key(run_uid, "compute")
    assert micro_run.idempotency_key == idempotency_key(run_uid, "microscope")
    assert f"experiment:{tomo_run.id}" in compute_run.tags and f"experiment:{tomo_run.id}" in micro_run.tags
    # Every file that landed at the compute facility is the one the manifest verified.
    destination = settings.compute_storage / run_uid
    manifest = json.loads((destination / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256_file(destination / entry["relative_path"]) == entry["sha256"]
    root = from_uri(settings.catalog.url, api_key=secret_value(settings.catalog.api_key))
    try:
        runs, processed = root["runs"], root["processed"]
        tomo = plain(runs[run_uid].metadata)
        assert tomo["start"]["identification"]["sample_name"] == "chain-01"
        assert tomo["stop"]["exit_status"] == "success"
        volume = plain(processed[f"{run_uid}-volume"].metadata)
        registration = plain(processed[f"{run_uid}-registration"].metadata)
        handoff = plain(processed[f"{run_uid}-handoff"].metadata)
        report = plain(processed[f"{run_uid}-report"].metadata)
        micrograph_uid = registration["micrograph_run_uid"]
        children = [micrograph_uid, *handoff["micrograph_run_uids"]]
        for uid in children:  # the micrographs are the tomography's children, and each succeeded
            child = plain(runs[uid].metadata)
            assert child["start"]["references"]["parent_uids"] == [run_uid]
            assert child["stop"]["exit_status"] == "success"
            assert child["start"]["identification"]["sample_name"] == "chain-01"
    finally:
        root.context.close()
    assert volume["parents"] == {"transfer": f"{run_uid}-transfer"} and volume["parent_run_uids"] == [run_uid]
    # The registration was made against the microscope's own verified copy of the volume.
    assert registration["parent_run_uids"] == [run_uid, micrograph_uid]
    assert registration["parents"] == {"volume": f"{run_uid}-volume"}
    registered_against = Path(registration["volume"]["path"])
    assert registered_against.is_relative_to(settings.microscope_storage.resolve())
    assert registration["volume"] == {"path": volume["locations"]["microscope"]["path"], "sha256": volume["locations"]["compute"]["sha256"]}
    assert sha256_file(registered_against) == sha256_file(Path(volume["locations"]["compute"]["path"]))
    assert registration["n_matches"] >= 5 and registration["rms_residual_um"] < 2.0
    assert handoff["parents"] == {"registration": f"{run_uid}-registration"}
    assert handoff["parent_run_uids"] == [run_uid, *handoff["micrograph_run_uids"]]
    assert handoff["true_error_um"] <= 1.0, handoff
    # The report's summary is the catalog's view of the chain.
    summary = report["summary"]
    assert summary["run_uids"] == {"tomography": run_uid, "micrograph": micrograph_uid, "handoff_micrographs": handoff["micrograph_run_uids"]}
    assert summary["registration"]["sample_from_microscope"] == registration["sample_from_microscope"]
    assert Path(summary["report_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
