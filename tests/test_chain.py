"""Chaining across facilities through a real Prefect server on PostgreSQL.

* ten parallel triggers of one stage for one run create exactly one flow run (idempotency keys);
* the whole chain: tomography on the beamline pool -> transfer + reconstruction on the compute
  pool -> volume copied to the microscope site, micrograph + registration against that copy on the
  microscope pool, with three process workers (one per site) and a Tiled server on PostgreSQL
  (slow: real processes, ~2 min on 2 cores).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid

import pytest
from facility_helpers import SharedFacility

from corrflow.flows.chain import idempotency_key, trigger_stage
from corrflow.flows.models import Sample


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


def test_idempotency_key_names_run_and_stage():
    assert idempotency_key("abc", "transfer-reconstruct") == "corrflow:abc:transfer-reconstruct"
    assert idempotency_key("abc", "transfer-reconstruct") != idempotency_key("abc", "micrograph-register")
    with pytest.raises(ValueError, match="stage"):
        idempotency_key("abc", "reconstruct-twice")
    with pytest.raises(ValueError, match="run_uid"):
        idempotency_key("", "transfer-reconstruct")


def test_ten_parallel_triggers_of_one_stage_create_exactly_one_flow_run(facility):
    run_uid = f"test-{uuid.uuid4()}"
    sample = Sample(name="idem-01")
    parameters = {"run_uid": run_uid, "files": ["x/a.h5"], "nxtomo_file": "x/a.nxs", "chain": False}
    barrier = threading.Barrier(10)
    ids, errors = [], []

    def trigger() -> None:
        barrier.wait()  # all ten hit the server together
        try:
            ids.append(trigger_stage("transfer-reconstruct", run_uid=run_uid, sample=sample, parameters=parameters).id)
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
        assert runs[0].idempotency_key == idempotency_key(run_uid, "transfer-reconstruct")
        assert runs[0].name == "compute · idem-01 · transfer + reconstruct"
        assert runs[0].state.is_scheduled()
    finally:
        # No worker may pick up this run with its made-up files later: delete it.
        asyncio.run(_delete_runs(runs))


async def _runs_of(deployment_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

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


async def _logs_of(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


async def _runs_named(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async with get_client() as client:
        return await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


@pytest.mark.slow
def test_full_chain_from_the_queue_through_three_site_workers_and_tiled_on_postgresql(facility):
    """Submit to the beamline's queue only; the dispatcher, the compute and the microscope stages
    must follow by themselves, each on its own site's worker."""
    import json
    from pathlib import Path

    from tiled.client import from_uri

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
        (compute_run,) = _wait_for_completed("transfer-reconstruct/compute", workers, timeout_s=300)
        (micro_run,) = _wait_for_completed("micrograph-register/microscope", workers, timeout_s=300)
    finally:
        for worker in workers:
            worker.stop()

    assert ExperimentQueue.from_settings(settings).get(entry.id).state == "completed"
    (tomo_run,) = asyncio.run(_runs_named(f"{settings.beamline.name} · chain-01 · tomography"))
    assert tomo_run.state.is_completed()  # ran as a sub-flow of the dispatcher, holding the slot
    assert micro_run.name == "sim-sem · chain-01 · micrograph + register"
    run_uid = compute_run.parameters["run_uid"]
    assert compute_run.idempotency_key == idempotency_key(run_uid, "transfer-reconstruct")
    assert micro_run.idempotency_key == idempotency_key(run_uid, "micrograph-register")
    # Every stage's product is on disk, verified, and the raw runs are in the Tiled server's catalog.
    destination = settings.compute_storage / run_uid
    manifest = json.loads((destination / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256_file(destination / entry["relative_path"]) == entry["sha256"]
    compute_volume = Path(micro_run.parameters["volume_path"])  # where the compute facility wrote it
    assert compute_volume.is_relative_to(settings.compute_storage)
    # The microscope stage copied it to its own storage and registered against that copy (its log
    # names the file it read); the copy's sha256 is the compute one's.
    deadline = time.monotonic() + 30  # the worker's log handler ships its last batch after the run ends
    while not (lines := [m for m in asyncio.run(_logs_of(micro_run.id)) if m.startswith("registering micrograph ")]):
        assert time.monotonic() < deadline, "the microscope stage never logged which volume it registered against"
        time.sleep(1.0)
    (line,) = lines
    read_path = Path(line.split(" into ", 1)[1].split(" (sha256 ", 1)[0])
    read_sha = line.rsplit("(sha256 ", 1)[1].rstrip(")")
    assert read_path.is_relative_to(settings.microscope_storage.resolve()), line
    assert sha256_file(read_path) == sha256_file(compute_volume) == read_sha
    root = from_uri(settings.catalog.url, api_key=settings.catalog.api_key)
    try:
        runs = root["runs"]
        tomo = runs[run_uid]
        assert tomo.metadata["start"]["identification"]["sample_name"] == "chain-01"
        assert tomo.metadata["stop"]["exit_status"] == "success"
        samples = [runs[uid].metadata["start"]["identification"]["sample_name"] for uid in runs]
        assert samples.count("chain-01") == 2, samples  # the tomography and the micrograph
        micrograph_uid = next(uid for uid in runs if uid != run_uid)
        assert runs[micrograph_uid].metadata["stop"]["exit_status"] == "success"
        locations = root["processed"][f"{run_uid}-volume"].metadata["locations"]
        assert locations["microscope"] == {
            "path": str(read_path), "sha256": read_sha, "manifest": str(read_path.parent / "volume-manifest.json")
        }
        assert locations["compute"] == {"path": str(compute_volume.resolve()), "sha256": read_sha}
    finally:
        root.context.close()
