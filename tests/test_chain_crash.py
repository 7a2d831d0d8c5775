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

    from corrflow.config.settings import secret_value

    root = from_uri(settings.catalog.url, api_key=secret_value(settings.catalog.api_key))
    try:
        if "runs" not in root:  # created by the first acquisition
            return []
        runs = root["runs"]
        return [dict(runs[uid].metadata) for uid in runs if runs[uid].metadata["start"]["identification"]["sample_name"] == sample]
    finally:
        root.context.close()


def _wait_until_acquiring(run_id, settings, sample: str, *, worker) -> None:
    """The flow run is Running and its run document is in the catalog: the RunEngine is acquiring
    (then 2 s more, so the scan is well under way)."""
    _wait_state(run_id, lambda s: s.is_running(), timeout_s=120, worker=worker)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not _runs_of_sample(settings, sample):
        time.sleep(0.5)
    time.sleep(2.0)


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


@pytest.mark.fault("cancel from the dashboard")
def test_cancelling_an_acquisition_deployment_run_aborts_the_run_engine_within_5_s(facility, fault_figures):
    from corrflow.acquisition.cancellation import cancel_flow_run
    from corrflow.operations.server import production_settings, start_worker

    settings = production_settings(facility.settings)
    worker = start_worker(facility.settings, "beamline", name="corrflow-beamline-cancel")
    try:
        run_id = _start_long_tomography("cancel-01", 6000)
        _wait_until_acquiring(run_id, settings, "cancel-01", worker=worker)
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
    fault_figures["cancel -> stop 'abort' (s)"] = round(latency_s, 2)
    assert latency_s < 5.0, f"stop document {latency_s:.2f} s after the cancel"


@pytest.mark.fault("flow-run process killed with its worker")
def test_a_worker_killed_mid_flow_is_marked_crashed_and_a_rerun_completes(facility, fault_figures):
    from corrflow.operations.server import production_settings, start_worker

    settings = production_settings(facility.settings)
    worker = start_worker(facility.settings, "beamline", name="corrflow-beamline-crash")
    run_id = _start_long_tomography("crash-01", 6000)
    try:
        _wait_until_acquiring(run_id, settings, "crash-01", worker=worker)
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
    fault_figures["killed -> run Crashed (s)"] = round(detected_s, 1)
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


def _active_slots(limit_name: str) -> int:
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return (await client.read_global_concurrency_limit_by_name(limit_name)).active_slots

    return asyncio.run(go())


def _wait_ended(processes, *, timeout_s):
    """The processes still running after ``timeout_s``; an exited one left unreaped (a zombie: the
    sandbox's init may not reap orphans) has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.fault("worker killed")
def test_a_flow_run_whose_worker_alone_is_killed_aborts_its_scan_frees_the_slot_and_ends(facility, fault_figures):
    """Only the worker dies (kill -9); its flow-run process, in a session of its own, would carry on
    heartbeating with the instrument's slot held. It sees it has lost its worker and ends itself:
    the scan is aborted with the reason, the slot freed, the run recorded Crashed."""
    from corrflow.operations.deploy import instrument_limit_name
    from corrflow.operations.server import production_settings, start_worker

    settings = production_settings(facility.settings)
    limit = instrument_limit_name(settings.beamline.name)
    worker = start_worker(facility.settings, "beamline", name="corrflow-beamline-orphan")
    run_id = _start_long_tomography("orphan-01", 6000)
    try:
        _wait_until_acquiring(run_id, settings, "orphan-01", worker=worker)
        assert _active_slots(limit) == 1
        flow_run_processes = psutil.Process(worker.process.pid).children(recursive=True)
        assert flow_run_processes, "the worker has started no flow-run process"
        killed_at = time.monotonic()
        psutil.Process(worker.process.pid).kill()  # the worker only
        worker.process.wait(10)
        alive = _wait_ended(flow_run_processes, timeout_s=60)
        ended_s = time.monotonic() - killed_at
        for process in alive:
            process.kill()
    finally:
        worker.stop()
    assert not alive, f"flow-run processes outlived their worker: {[p.pid for p in alive]}"
    final = _wait_state(run_id, lambda s: s.is_final(), timeout_s=30, worker=worker)
    (run,) = _runs_of_sample(settings, "orphan-01")
    assert final.is_crashed() or final.is_failed(), final
    assert run["stop"]["exit_status"] == "abort", run["stop"]
    assert f"the worker (pid {worker.process.pid}) that started flow run {run_id} is gone" in run["stop"]["reason"]
    assert _active_slots(limit) == 0, "the instrument slot is still held"
    assert not list(settings.beamline_storage.rglob("orphan-01_*_nxtomo.nxs"))
    fault_figures["worker killed -> flow-run process ended (s)"] = round(ended_s, 1)
    fault_figures["slot held after"] = _active_slots(limit)
    fault_figures["run"] = f"{final.type.value}, stop {run['stop']['exit_status']}"
    print(
        f"worker killed -> flow-run process ended {ended_s:.1f} s later; run {final.type.value}, "
        f"{run['stop']['num_events'].get('primary', 0)} of 6000 projections, stop 'abort', slot free"
    )
