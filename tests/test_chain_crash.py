"""Dashboard operation through real workers: cancelling an acquisition run aborts the RunEngine
within 5 s; a worker killed mid-flow leaves a run that the zombie automation marks Crashed, nothing
of it reaches the compute facility, and a re-run completes after closing the dead run's catalog
entry as failed (corrflow.catalog.reconcile). Slow: real processes, minutes."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
from facility_helpers import SharedFacility

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def facility(request):
    facility = SharedFacility.get(request.config)
    facility.bootstrap()
    facility.ensure_tiled()
    with facility.client():
        yield facility


def _state(flow_run_id):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    return asyncio.run(go())


def _wait_state(flow_run_id, predicate, *, timeout_s, worker):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _state(flow_run_id)
        if predicate(state):
            return state
        time.sleep(0.5)
    pytest.fail(f"flow run {flow_run_id} still {state.type.value} after {timeout_s} s\n{worker.log_tail(60)}")


def _runs_of_sample(settings, sample):
    from tiled.client import from_uri

    root = from_uri(settings.catalog.url, api_key=settings.catalog.api_key)
    try:
        if "runs" not in root:  # created by the first acquisition
            return []
        runs = root["runs"]
        return [dict(runs[uid].metadata) for uid in runs if runs[uid].metadata["start"]["identification"]["sample_name"] == sample]
    finally:
        root.context.close()


def _start_long_tomography(sample: str, projections: int):
    from prefect.deployments import run_deployment

    return run_deployment(
        "correlative-chain/beamline",
        parameters={
            "request": {"sample": {"name": sample}, "tomography": {"num_projections": projections}},
            "site": "beamline",
            "chain": False,
        },
        timeout=0,
        as_subflow=False,
    ).id


def test_cancelling_an_acquisition_deployment_run_aborts_the_run_engine_within_5_s(facility):
    from corrflow.acquisition.cancellation import cancel_flow_run
    from corrflow.operations.server import production_settings, start_worker

    settings = production_settings(facility.settings)
    worker = start_worker(facility.settings, "beamline", name="corrflow-beamline-cancel")
    try:
        run_id = _start_long_tomography("cancel-01", 6000)
        _wait_state(run_id, lambda s: s.is_running(), timeout_s=120, worker=worker)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not _runs_of_sample(settings, "cancel-01"):
            time.sleep(0.5)  # the run document is in the catalog: the RunEngine is acquiring
        time.sleep(2.0)
        requested = time.time()
        cancel_flow_run(str(run_id))
        final = _wait_state(run_id, lambda s: s.is_final(), timeout_s=60, worker=worker)
    finally:
        worker.stop()
    assert final.is_cancelled(), final
    (run,) = _runs_of_sample(settings, "cancel-01")
    assert run.get("stop"), f"no stop document\n{worker.log_tail(80)}"
    assert run["stop"]["exit_status"] == "abort", run["stop"]
    latency_s = run["stop"]["time"] - requested
    print(f"cancel request -> stop document (exit_status abort): {latency_s:.2f} s")
    assert latency_s < 5.0, f"stop document {latency_s:.2f} s after the cancel"


def test_a_worker_killed_mid_flow_is_marked_crashed_and_a_rerun_completes(facility):
    from corrflow.operations.server import production_settings, start_worker

    settings = production_settings(facility.settings)
    worker = start_worker(facility.settings, "beamline", name="corrflow-beamline-crash")
    run_id = _start_long_tomography("crash-01", 6000)
    try:
        _wait_state(run_id, lambda s: s.is_running(), timeout_s=120, worker=worker)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not _runs_of_sample(settings, "crash-01"):
            time.sleep(0.5)  # mid-flow: the RunEngine is writing the run
        time.sleep(2.0)
        tree = [psutil.Process(worker.process.pid), *psutil.Process(worker.process.pid).children(recursive=True)]
        killed_at = time.monotonic()
        for process in tree:  # the worker and the flow-run process it started: a machine dying
            process.kill()
        worker.process.wait(10)
    finally:
        worker.stop()
    crashed = _wait_state(run_id, lambda s: s.is_final(), timeout_s=settings.server.zombie_after_s + 90, worker=worker)
    detected_s = time.monotonic() - killed_at
    print(f"worker killed -> run Crashed: {detected_s:.1f} s (heartbeat {settings.server.heartbeat_s} s, window {settings.server.zombie_after_s} s)")
    assert crashed.is_crashed(), crashed
    assert detected_s < settings.server.heartbeat_s + settings.server.zombie_after_s + 30
    # Nothing of the killed run went on: no NeXus export, nothing at the compute facility, and its
    # catalog entry has no stop document (readers see it as incomplete, never as a success).
    (partial,) = _runs_of_sample(settings, "crash-01")
    assert partial.get("stop") is None
    assert not list(settings.beamline_storage.rglob("crash-01_*_nxtomo.nxs"))
    assert not (settings.compute_storage / partial["start"]["uid"]).exists()
    # A re-run completes once the dead run's instrument lease has expired.
    worker = start_worker(facility.settings, "beamline", name="corrflow-beamline-rerun")
    try:
        rerun = _start_long_tomography("crash-01", 60)
        done = _wait_state(rerun, lambda s: s.is_final(), timeout_s=settings.queue.lease_s + 180, worker=worker)
    finally:
        worker.stop()
    assert done.is_completed(), done
    # The re-run's acquisition first closed the dead run's entry: a stop document "fail" that names
    # the crashed flow run, written before the new run started; never a success.
    runs = {r["start"]["uid"]: r for r in _runs_of_sample(settings, "crash-01")}
    lost = runs.pop(partial["start"]["uid"])
    assert lost["start"]["producer"]["flow_run_id"] == str(run_id)
    assert lost["stop"]["exit_status"] == "fail", lost["stop"]
    assert lost["stop"]["reason"] == f"acquisition process lost (flow run {run_id} {crashed.name})"
    (again,) = runs.values()
    assert again["stop"]["exit_status"] == "success"
    assert lost["stop"]["time"] < again["start"]["time"]
    print(f"crashed run closed {lost['stop']['time'] - lost['start']['time']:.0f} s after it started, by the re-run's acquisition")
