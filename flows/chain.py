"""Chaining across facilities: each site's deployment does its stage, then starts the next site's.

::

    beamline pool    tomography-chain/beamline        acquire (holding the instrument slot)
                          | run_deployment, idempotency key "<run uid>:transfer-reconstruct"
    compute pool     transfer-reconstruct/compute     verified transfer -> reconstruction
                          | run_deployment, idempotency key "<run uid>:micrograph-register"
    microscope pool  micrograph-register/microscope   verified copy of the volume to the microscope's
                                                      storage -> micrograph (holding its slot) ->
                                                      registration against that copy

A stage is triggered with an idempotency key derived from the tomography run uid and the stage,
so a retried or doubled trigger (a flow retry, two operators, a network timeout after the server
created the run) creates exactly one flow run of the next stage. Triggers do not wait: the
beamline is free for the next sample while the compute facility reconstructs.

The stage functions are those of ``corrflow.flows``: transfer, reconstruct, ship-volume and
register run as sub-flows; the acquisitions call ``run_tomography`` / ``run_micrograph`` (what the
acquire flows wrap) through :func:`corrflow.acquisition.cancellation.run_abortable`, so that cancelling the
run aborts the RunEngine cleanly (see there). Nothing is re-implemented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow

from corrflow.acquisition.cancellation import run_abortable
from corrflow.deployments import deployment_path
from corrflow.flows._common import flow_settings
from corrflow.flows.acquire import run_micrograph, run_tomography
from corrflow.flows.models import MicrographParameters, ReconstructionParameters, Sample, TomographyParameters
from corrflow.flows.reconstruct import reconstruct
from corrflow.flows.register import register
from corrflow.flows.transfer import ship_volume, transfer
from corrflow.operations.queue import instrument_slot
from corrflow.config.settings import Site, load_settings

Stage = Literal["transfer-reconstruct", "micrograph-register"]
#: stage -> (flow name, site whose pool runs it)
STAGES: dict[str, tuple[str, Site]] = {
    "transfer-reconstruct": ("transfer-reconstruct", "compute"),
    "micrograph-register": ("micrograph-register", "microscope"),
}
#: stage -> the words flow-run names use for it
STAGE_LABELS = {"transfer-reconstruct": "transfer + reconstruct", "micrograph-register": "micrograph + register"}


def idempotency_key(run_uid: str, stage: str) -> str:
    """The key that makes "start ``stage`` for run ``run_uid``" happen once, however often it is asked."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    if not run_uid:
        raise ValueError("run_uid must not be empty")
    return f"corrflow:{run_uid}:{stage}"


def chain_run_name(instrument: str, sample: str, stage: str) -> str:
    """Flow-run names say instrument, sample and stage: ``sim-tomo · s1 · tomography``."""
    return f"{instrument} · {sample} · {stage}"


def _instrument_for(site: Site) -> str:
    settings = load_settings()
    return {"beamline": settings.beamline.name, "microscope": settings.microscope.name}.get(site, site)


def _name_factory(site: Site, stage: str):
    def _name() -> str:
        from prefect.runtime import flow_run

        from corrflow.flows._common import _sample_name

        return chain_run_name(_instrument_for(site), _sample_name(flow_run.parameters), stage)

    return _name


def trigger_stage(stage: Stage, *, run_uid: str, sample: Sample, parameters: dict[str, Any]) -> Any:
    """Create (once) the flow run of ``stage`` for ``run_uid`` on its site's pool; returns that FlowRun.

    Does not wait for it. Safe to call any number of times, concurrently: the server keeps one run
    per idempotency key and returns it to every caller.
    """
    from prefect.deployments import run_deployment

    flow_name, site = STAGES[stage]
    return run_deployment(
        deployment_path(flow_name, site),
        parameters={"sample": sample.model_dump(mode="json"), **parameters},
        idempotency_key=idempotency_key(run_uid, stage),
        flow_run_name=chain_run_name(_instrument_for(site), sample.name, STAGE_LABELS[stage]),
        tags=[f"run:{run_uid}", f"stage:{stage}"],
        timeout=0,
        # A separate run, not a sub-flow: it belongs to another facility and outlives this one.
        as_subflow=False,
    )


@flow(name="tomography-chain", flow_run_name=_name_factory("beamline", "tomography"), log_prints=True)
def tomography_chain(
    sample: Sample = Sample(),
    tomography: TomographyParameters = TomographyParameters(),
    reconstruction: ReconstructionParameters = ReconstructionParameters(),
    micrograph: MicrographParameters = MicrographParameters(),
    chain: bool = True,
) -> dict[str, Any]:
    """Tomography at the beamline (holding the instrument), then start transfer + reconstruction
    at the compute facility (which then starts the micrograph + registration at the microscope)."""
    settings = flow_settings()
    # run_abortable: cancelling this run aborts the RunEngine (motors stopped, stop document) first.
    with instrument_slot(settings, settings.beamline.name):
        acquired = run_abortable(lambda: run_tomography(settings, sample, tomography), reason="tomography cancelled")
    print(f"run {acquired.run_uid}: {len(acquired.files)} files, NXtomo {acquired.nexus_path}")
    result: dict[str, Any] = {"run_uid": acquired.run_uid, "nexus_path": str(acquired.nexus_path)}
    if chain:
        root = settings.beamline_storage
        nexus = acquired.nexus_path
        triggered = trigger_stage(
            "transfer-reconstruct",
            run_uid=acquired.run_uid,
            sample=sample,
            parameters={
                "run_uid": acquired.run_uid,
                "files": [str(Path(f).relative_to(root)) for f in acquired.files],
                "nxtomo_file": str(Path(nexus).relative_to(root)),
                "reconstruction": reconstruction.model_dump(mode="json"),
                "micrograph": micrograph.model_dump(mode="json"),
            },
        )
        result["next_flow_run_id"] = str(triggered.id)
        print(f"run {acquired.run_uid}: transfer + reconstruction started as flow run {triggered.id}")
    return result


@flow(name="transfer-reconstruct", flow_run_name=_name_factory("compute", STAGE_LABELS["transfer-reconstruct"]), log_prints=True)
def transfer_reconstruct(
    sample: Sample,
    run_uid: str,
    files: list[str],
    nxtomo_file: str,
    reconstruction: ReconstructionParameters = ReconstructionParameters(),
    micrograph: MicrographParameters = MicrographParameters(),
    chain: bool = True,
) -> dict[str, Any]:
    """Pull a run's raw files from the beamline (sha256-verified), reconstruct, then start registration.

    ``files`` and ``nxtomo_file`` are relative to the beamline storage root, so each facility
    resolves them against its own view of that storage (mount or SSH).
    """
    moved = transfer(sample, [Path(f) for f in files], run_uid)
    volume = reconstruct(sample, moved.destination_root / nxtomo_file, run_uid, reconstruction)
    result: dict[str, Any] = {"volume_path": str(volume.volume_path), "manifest_path": str(moved.manifest_path)}
    if chain:
        triggered = trigger_stage(
            "micrograph-register",
            run_uid=run_uid,
            sample=sample,
            parameters={
                "tomography_run_uid": run_uid,
                "volume_path": str(volume.volume_path),
                "micrograph": micrograph.model_dump(mode="json"),
            },
        )
        result["next_flow_run_id"] = str(triggered.id)
        print(f"run {run_uid}: micrograph + registration started as flow run {triggered.id}")
    return result


@flow(name="micrograph-register", flow_run_name=_name_factory("microscope", STAGE_LABELS["micrograph-register"]), log_prints=True)
def micrograph_register(
    sample: Sample,
    tomography_run_uid: str,
    volume_path: str,
    micrograph: MicrographParameters = MicrographParameters(),
) -> dict[str, Any]:
    """Copy the volume to the microscope site (sha256-verified), image the sectioned sample (holding
    the microscope) and register the micrograph into the local copy of the X-ray volume.

    ``volume_path`` is where the compute facility wrote the volume; everything after the copy
    reads ``<microscope_storage>/<run uid>/`` only.
    """
    settings = flow_settings()
    # Before taking the microscope: a failed copy must not cost instrument time.
    shipped = ship_volume(sample, tomography_run_uid, Path(volume_path))
    with instrument_slot(settings, settings.microscope.name):
        imaged = run_abortable(lambda: run_micrograph(settings, sample, micrograph), reason="micrograph cancelled")
    print(f"registering micrograph {imaged.run_uid} into {shipped.volume_path} (sha256 {shipped.sha256})")
    registered = register(sample, shipped.volume_path, imaged.run_uid, micrograph)
    return {
        "tomography_run_uid": tomography_run_uid,
        "micrograph_run_uid": imaged.run_uid,
        "volume_path": str(shipped.volume_path),
        "volume_sha256": shipped.sha256,
        "registration": registered.model_dump(mode="json"),
    }
