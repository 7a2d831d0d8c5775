"""The report stage: the summary of a correlative experiment, built from what the catalog holds.

Whichever runner ran the chain (in process, or across facilities), the stages catalogued their
products as they made them, linked to their parents: the raw runs under ``/runs``, and under
``/processed`` the transfer (``<run uid>-transfer``), the volume (``-volume``), the registration
(``-registration``) and the hand-off (``-handoff``). This stage reads them back, scores them against
the simulated truth when the instruments are simulated, writes the summary JSON and the PNG report
beside the microscope's copy of the volume, and catalogues the report (``-report``, its metadata the
summary). :func:`read_summary` is how anyone (the demo, a test, a dashboard) reads it back.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import numpy as np

import corrflow
from corrflow.catalog.tiled import Catalog, open_catalog, plain, product_key, record_product
from corrflow.config.settings import Settings
from corrflow.flows.models import ExperimentReport, ExperimentRequest, StoredFile, TomographyRun
from corrflow.flows.register import load_micrograph
from corrflow.processing.section_height import micrograph_on_slice_grid
from corrflow.report import ground_truth
from corrflow.report.png import write_report

#: The products a complete chain catalogues under /processed, by the suffix of their keys.
PRODUCT_KINDS = ("transfer", "volume", "registration", "handoff")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def catalogued_products(catalog: Catalog, run_uid: str) -> dict[str, dict[str, Any]]:
    """The metadata of every product of run ``run_uid``, by kind; a missing one is an error naming it."""
    found: dict[str, dict[str, Any]] = {}
    for kind in PRODUCT_KINDS:
        key = product_key(run_uid, kind)
        if key not in catalog.processed:
            raise KeyError(f"the catalog has no {kind} product {key!r} of run {run_uid}: the chain did not finish it")
        found[kind] = plain(catalog.processed[key].metadata)
    return found


def _scores(
    settings: Settings, *, run: Any, volume: np.ndarray, voxel_size_um: float, registration: dict[str, Any], micrograph: Any
) -> dict[str, Any]:
    from corrflow.simulators.world import SimulatedWorld

    world = SimulatedWorld(settings.simulation)
    primary = run["primary"]
    z_key = next(k for k in primary if k.endswith("stage_z"))
    stage_z_um = float(np.mean(np.asarray(primary[z_key].read(), dtype=np.float64)))
    truth = ground_truth.phantom_on_volume_grid(
        world.phantom(), shape_zyx=volume.shape, voxel_size_um=voxel_size_um, stage_z_um=stage_z_um
    )
    reg_error = ground_truth.registration_error(
        np.asarray(registration["sample_from_microscope"]),
        world.sample_from_microscope,
        field_points_um=ground_truth.field_of_view_points(
            shape_px=micrograph.image.shape,
            pixel_size_um=micrograph.pixel_size_um,
            stage_x_um=micrograph.stage_x_um,
            stage_y_um=micrograph.stage_y_um,
        ),
    )
    return {"truth": truth, "reconstruction": ground_truth.reconstruction_error(volume, truth), "registration": reg_error}


def describe_registration(registration: dict[str, Any]) -> str:
    """One line: how the micrograph was registered and its quality figure.

    The fiducial residual when fiducials were matched (every method is checked against them where it
    can be); else the method's own figure (e.g. the normalized mutual information).
    """
    method = registration.get("method", "fiducials")
    prefix = "" if method == "fiducials" else f"{method}: "
    if registration.get("rms_residual_um") is not None:
        return f"{prefix}{registration['n_matches']} fiducials, {registration['rms_residual_um']:.2f} um RMS residual"
    quality = registration.get("quality") or {}
    figure = f"{quality.get('name', 'quality')} {quality.get('value', float('nan')):.3f} {quality.get('unit', '')}".rstrip()
    return f"{prefix}{figure} (no fiducials matched)"


def report_stage(settings: Settings, request: ExperimentRequest, *, tomography: TomographyRun) -> ExperimentReport:
    """Summarise run ``tomography.run_uid``'s chain from the catalog; write and catalogue the report."""
    import h5py

    uid = tomography.run_uid
    out_dir = settings.microscope_storage / uid / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    simulated = settings.beamline.mode == "sim" and settings.microscope.mode == "sim"
    with open_catalog(settings) as catalog:
        run = catalog.runs[uid]
        start, stop = plain(run.metadata["start"]), plain(run.metadata.get("stop") or {})
        products = catalogued_products(catalog, uid)
        volume_md, registration, handoff = products["volume"], products["registration"], products["handoff"]
        micrograph_uid = registration["micrograph_run_uid"]
        image = load_micrograph(settings, micrograph_uid)
        local_volume = volume_md["locations"]["microscope"]["path"]
        with h5py.File(local_volume, "r") as f:
            volume = np.asarray(f["/entry/data/data"][()])
        voxel = float(volume_md["voxel_size_um"])
        scores = (
            _scores(settings, run=run, volume=volume, voxel_size_um=voxel, registration=registration, micrograph=image)
            if simulated
            else None
        )
        identification = start["identification"]
        summary: dict[str, Any] = {
            "sample": {k: identification.get(k) for k in ("sample_name", "proposal", "user", "description")},
            "created": datetime.now(timezone.utc).isoformat(),
            "software_version": corrflow.__version__,
            "run_uids": {"tomography": uid, "micrograph": micrograph_uid, "handoff_micrographs": handoff["micrograph_run_uids"]},
            "tomography": {"exit_status": stop.get("exit_status"), "instrument": identification.get("instrument"),
                           "num_projections": start["settings"]["parameters"]["num_projections"]},
            "raw_nxtomo_path": products["transfer"]["source_nxtomo_path"],
            "transfer": {k: products["transfer"][k] for k in ("destination", "manifest", "total_bytes", "seconds")},
            "volume_path": volume_md["locations"]["compute"]["path"],
            "microscope_volume": volume_md["locations"]["microscope"],
            "reconstruction": {"center_px": volume_md["center_px"], "voxel_size_um": voxel,
                               "shape_zyx": list(volume.shape), "seconds": volume_md["seconds"]},
            "registration": {k: v for k, v in registration.items() if k not in ("kind", "parent_run_uids", "parents")},
            "roi_handoff": {k: v for k, v in handoff.items() if k not in ("kind", "parent_run_uids", "parents")},
            "reconstruction_error": scores["reconstruction"].as_dict() if scores else None,
            "registration_error": scores["registration"].as_dict() if scores else None,
        }
    k = int(registration["slice_index"])
    estimated = np.asarray(registration["sample_from_microscope"])
    overlay = micrograph_on_slice_grid(
        image.image,
        sample_from_microscope=estimated,
        micrograph_pixel_size_um=image.pixel_size_um,
        stage_x_um=image.stage_x_um,
        stage_y_um=image.stage_y_um,
        slice_shape=volume.shape[1:],
        voxel_size_um=voxel,
        slice_z_um=float(registration["section_z_um"]),
    )
    name = summary["sample"]["sample_name"]
    lines = [
        f"sample          {name} ({summary['sample']['proposal']})",
        f"tomography run  {uid[:8]}",
        f"micrograph run  {micrograph_uid[:8]}",
        f"centre          {summary['reconstruction']['center_px']:.2f} px",
        f"section         z = {registration['section_z_um']:.2f} um (slice {k})",
        f"registration    scale {registration['scale']:.4f}",
        f"                rotation {registration['rotation_deg']:.3f} deg",
        f"                {describe_registration(registration)}",
        f"ROI hand-off    feature at ({', '.join(f'{v:.0f}' for v in handoff['roi_sample_um'])}) um",
        f"                stage -> ({handoff['stage_x_um']:.1f}, {handoff['stage_y_um']:.1f}) um",
        f"                seen {_fmt(handoff['first_pass_offset_um'])} -> {_fmt(handoff['observed_offset_um'])} um off centre",
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
            f"  ROI hand-off error   {_fmt(handoff['first_pass_true_error_um'])} -> {_fmt(handoff['true_error_um'])} um",
        ]
    picture = write_report(
        out_dir / "report.png",
        title=f"corrflow correlative experiment: {name}",
        volume_slice=volume[k],
        vertical_slice=volume[:, volume.shape[1] // 2, :],
        truth_slice=None if scores is None else scores["truth"][k],
        micrograph=image.image,
        micrograph_on_slice=overlay,
        voxel_size_um=voxel,
        micrograph_pixel_size_um=image.pixel_size_um,
        matched_fiducials_um=np.asarray(registration["matched_fiducials_um"], dtype=np.float64).reshape(-1, 2),
        lines=lines,
    )
    summary_path = out_dir / "summary.json"
    summary["report_png"] = str(picture.resolve())
    summary["summary_path"] = str(summary_path.resolve())
    summary_path.write_text(json.dumps(summary, indent=2))
    key = product_key(uid, "report")
    with open_catalog(settings) as catalog:
        record_product(
            catalog,
            key,
            {
                "kind": "report",
                "parent_run_uids": [uid, micrograph_uid, *handoff["micrograph_run_uids"]],
                "parents": {kind: product_key(uid, kind) for kind in PRODUCT_KINDS},
                "summary": summary,
            },
        )
    print(f"report of run {uid}: {picture} (summary {summary_path})")
    return ExperimentReport(
        catalog_key=key,
        summary=StoredFile.under(settings, "microscope", summary_path),
        picture=StoredFile.under(settings, "microscope", picture),
    )


def read_summary(settings: Settings, run_uid: str) -> dict[str, Any]:
    """The summary of run ``run_uid``'s experiment, as the catalog holds it."""
    with open_catalog(settings) as catalog:
        key = product_key(run_uid, "report")
        if key not in catalog.processed:
            raise KeyError(f"the catalog has no report {key!r}: the chain of run {run_uid} did not finish")
        return plain(catalog.processed[key].metadata["summary"])
