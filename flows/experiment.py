"""The correlative experiment: tomography -> transfer -> reconstruction -> volume to the microscope
site -> micrograph -> registration -> ROI hand-off.

On one machine the stages run as sub-flows of this flow in one process (embedded defaults). In
production each stage is a deployment on its facility's work pool (issue #6); the stage functions
are the same.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import corrflow
from corrflow.report import ground_truth, progress
from corrflow.flows._common import flow_settings, run_name
from corrflow.flows.acquire import acquire_micrograph, acquire_tomography
from corrflow.flows.handoff import HandoffResult, RoiRequest, roi_handoff
from corrflow.flows.models import (
    AcquisitionResult,
    MicrographParameters,
    ReconstructionParameters,
    ReconstructionResult,
    RegistrationSummary,
    Sample,
    TomographyParameters,
    TransferResult,
)
from corrflow.flows.reconstruct import reconstruct
from corrflow.flows.register import load_micrograph, register
from corrflow.flows.transfer import ShippedVolume, ship_volume, transfer
from corrflow.processing.section_height import micrograph_on_slice_grid
from corrflow.report.png import write_report
from corrflow.config.settings import Settings
from corrflow.simulators.world import SimulatedWorld


def _stage_z_um(nexus_path: Path) -> float:
    with h5py.File(nexus_path, "r") as f:
        keys = f["/entry/instrument/detector/image_key"][()]
        return float(np.mean(f["/entry/sample/z_translation"][()][keys == 0]))


def score_against_truth(
    settings: Settings,
    *,
    tomography: AcquisitionResult,
    reconstruction: ReconstructionResult,
    registration: RegistrationSummary,
    micrograph_run_uid: str,
) -> dict[str, Any]:
    """Reconstruction and registration errors against the simulated world's truth, plus report arrays."""
    world = SimulatedWorld(settings.simulation)
    with h5py.File(reconstruction.volume_path, "r") as f:
        volume = np.asarray(f["/entry/data/data"][()])
    truth = ground_truth.phantom_on_volume_grid(
        world.phantom(),
        shape_zyx=volume.shape,
        voxel_size_um=reconstruction.voxel_size_um,
        stage_z_um=_stage_z_um(tomography.nexus_path),
    )
    recon_error = ground_truth.reconstruction_error(volume, truth)
    image = load_micrograph(settings, micrograph_run_uid)
    estimated = np.asarray(registration.sample_from_microscope)
    reg_error = ground_truth.registration_error(
        estimated,
        world.sample_from_microscope,
        field_points_um=ground_truth.field_of_view_points(
            shape_px=image.image.shape,
            pixel_size_um=image.pixel_size_um,
            stage_x_um=image.stage_x_um,
            stage_y_um=image.stage_y_um,
        ),
    )
    return {"volume": volume, "truth": truth, "micrograph": image, "reconstruction": recon_error, "registration": reg_error}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@task(cache_policy=NO_CACHE)
def summarize(
    settings: Settings,
    sample: Sample,
    tomography: AcquisitionResult,
    moved: TransferResult,
    reconstruction: ReconstructionResult,
    shipped: ShippedVolume,
    micrograph: AcquisitionResult,
    registration: RegistrationSummary,
    handoff: HandoffResult,
) -> dict[str, Any]:
    """Score against the truth (simulated instruments), write the PNG report and the summary JSON."""
    out_dir = settings.data_root / "reports" / f"{sample.name}_{tomography.run_uid[:8]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    simulated = settings.beamline.mode == "sim" and settings.microscope.mode == "sim"
    scores = (
        score_against_truth(
            settings,
            tomography=tomography,
            reconstruction=reconstruction,
            registration=registration,
            micrograph_run_uid=micrograph.run_uid,
        )
        if simulated
        else None
    )
    k = registration.slice_index
    estimated = np.asarray(registration.sample_from_microscope)
    if scores is not None:
        volume, truth, image = scores["volume"], scores["truth"], scores["micrograph"]
    else:
        with h5py.File(reconstruction.volume_path, "r") as f:
            volume = np.asarray(f["/entry/data/data"][()])
        truth, image = None, load_micrograph(settings, micrograph.run_uid)
    voxel = reconstruction.voxel_size_um
    slice_z_um = registration.section_z_um
    summary: dict[str, Any] = {
        "sample": sample.model_dump(),
        "created": datetime.now(timezone.utc).isoformat(),
        "software_version": corrflow.__version__,
        "run_uids": {"tomography": tomography.run_uid, "micrograph": micrograph.run_uid},
        "raw_nxtomo_path": str(tomography.nexus_path),
        "raw_files": [str(p) for p in tomography.files],
        "transfer": {"destination": str(moved.destination_root), "manifest": str(moved.manifest_path),
                     "total_bytes": moved.total_bytes, "seconds": moved.seconds},
        "volume_path": str(reconstruction.volume_path),
        "microscope_volume": {"path": str(shipped.volume_path), "sha256": shipped.sha256,
                              "manifest": str(shipped.manifest_path), "seconds": shipped.seconds},
        "reconstruction": {"center_px": reconstruction.center_px, "voxel_size_um": voxel,
                           "shape_zyx": list(reconstruction.shape_zyx), "seconds": reconstruction.seconds},
        "registration": registration.model_dump(),
        "reconstruction_error": scores["reconstruction"].as_dict() if scores else None,
        "registration_error": scores["registration"].as_dict() if scores else None,
        "roi_handoff": handoff.model_dump(),
    }
    overlay = micrograph_on_slice_grid(
        image.image,
        sample_from_microscope=estimated,
        micrograph_pixel_size_um=image.pixel_size_um,
        stage_x_um=image.stage_x_um,
        stage_y_um=image.stage_y_um,
        slice_shape=volume.shape[1:],
        voxel_size_um=voxel,
        slice_z_um=slice_z_um,
    )
    lines = [
        f"sample          {sample.name} ({sample.proposal})",
        f"tomography run  {tomography.run_uid[:8]}",
        f"micrograph run  {micrograph.run_uid[:8]}",
        f"centre          {reconstruction.center_px:.2f} px",
        f"section         z = {slice_z_um:.2f} um (slice {k})",
        f"registration    scale {registration.scale:.4f}",
        f"                rotation {registration.rotation_deg:.3f} deg",
        f"                residual {registration.rms_residual_um:.2f} um RMS",
        f"                {registration.n_matches} fiducials matched",
        f"ROI hand-off    feature at ({', '.join(f'{v:.0f}' for v in handoff.roi_sample_um)}) um",
        f"                stage -> ({handoff.stage_x_um:.1f}, {handoff.stage_y_um:.1f}) um",
        f"                seen {_fmt(handoff.first_pass_offset_um)} -> {_fmt(handoff.observed_offset_um)} um off centre",
    ]
    if scores:
        r, g = scores["reconstruction"], scores["registration"]
        lines += [
            "",
            "against the simulated truth:",
            f"  recon NRMSE          {r.nrmse:.3f}",
            f"  matrix mean error    {r.matrix_mean_error_pct:+.1f} %",
            f"  registration error   {g.rms_um:.2f} um RMS",
            f"  rotation error       {g.rotation_error_deg:.3f} deg",
            f"  scale error          {g.scale_error_pct:.3f} %",
            f"  ROI hand-off error   {_fmt(handoff.first_pass_true_error_um)} -> {_fmt(handoff.true_error_um)} um",
        ]
    report_path = write_report(
        out_dir / "report.png",
        title=f"corrflow correlative experiment: {sample.name}",
        volume_slice=volume[k],
        vertical_slice=volume[:, volume.shape[1] // 2, :],
        truth_slice=None if truth is None else truth[k],
        micrograph=image.image,
        micrograph_on_slice=overlay,
        voxel_size_um=voxel,
        micrograph_pixel_size_um=image.pixel_size_um,
        matched_fiducials_um=np.asarray(registration.matched_fiducials_um, dtype=np.float64).reshape(-1, 2),
        lines=lines,
    )
    summary["report_png"] = str(report_path)
    summary_path = out_dir / "summary.json"
    summary["summary_path"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


@flow(name="correlative-experiment", flow_run_name=run_name("correlative experiment"), log_prints=True)
def correlative_experiment(
    sample: Sample = Sample(),
    tomography: TomographyParameters = TomographyParameters(),
    micrograph: MicrographParameters = MicrographParameters(),
    reconstruction: ReconstructionParameters = ReconstructionParameters(),
    roi: RoiRequest = RoiRequest(),
) -> dict[str, Any]:
    """The whole chain for one sample; returns the summary (also written as JSON beside the PNG report)."""
    settings = flow_settings()
    stages = 8
    progress.report("experiment (stages)", 0, stages)
    acquired = acquire_tomography(sample, tomography)
    progress.report("experiment (stages)", 1, stages)
    moved = transfer(sample, list(acquired.files), acquired.run_uid)
    progress.report("experiment (stages)", 2, stages)
    nexus_at_compute = moved.destination_root / acquired.nexus_path.relative_to(settings.beamline_storage)
    volume = reconstruct(sample, nexus_at_compute, acquired.run_uid, reconstruction)
    progress.report("experiment (stages)", 3, stages)
    # The microscope's stages read their own verified copy, as they do across facilities.
    shipped = ship_volume(sample, acquired.run_uid, volume.volume_path)
    progress.report("experiment (stages)", 4, stages)
    imaged = acquire_micrograph(sample, micrograph)
    progress.report("experiment (stages)", 5, stages)
    registered = register(sample, shipped.volume_path, imaged.run_uid, micrograph)
    progress.report("experiment (stages)", 6, stages)
    handed_off = roi_handoff(sample, shipped.volume_path, registered, roi)
    progress.report("experiment (stages)", 7, stages)
    summary = summarize(settings, sample, acquired, moved, volume, shipped, imaged, registered, handed_off)
    progress.report("experiment (stages)", 8, stages)
    print(f"summary: {summary['summary_path']}")
    return summary
