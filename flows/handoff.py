"""ROI hand-off: a feature found in the X-ray volume, found again on the microscope.

1. Choose the region of interest in the reconstructed volume: given coordinates, or the largest
   pore / precipitate that the sectioned plane cuts (the microscope sees only that plane).
2. Map it to microscope stage coordinates through the registered ``sample_from_microscope``.
3. Run the validated micrograph plan there (stage limits are checked before anything moves).
4. Find the feature in the new micrograph and report how far from the image centre it landed
   (the hand-off error an operator sees); in simulation, also against the true transform.
5. Optionally centre it: one corrective move by the offset measured in that micrograph (3 um
   pixels, where the X-ray volume had 8 um voxels), a last image, and the same two errors again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from corrflow.report import progress
from corrflow.catalog.tiled import open_catalog, product_key, record_product
from corrflow.flows.acquire import run_micrograph
from corrflow.flows.models import (
    ExperimentRequest,
    HandoffResult,
    RegisteredMicrograph,
    RoiRequest,
    Sample,
    ShippedVolume,
    TomographyRun,
)
from corrflow.flows.register import load_micrograph
from corrflow.plans.requests import MicrographRequest
from corrflow.processing import transforms
from corrflow.processing.registration import RegistrationError, detect_fiducials
from corrflow.processing.roi import microscope_target
from corrflow.processing.volume_features import VolumeFeature, detect_volume_features
from corrflow.config.settings import Settings


class HandoffError(RuntimeError):
    """The region of interest cannot be handed off; the message says why."""


@dataclass(frozen=True)
class _Roi:
    centre_um: np.ndarray
    radius_um: float | None
    polarity: Literal["dark", "bright"] | None


def choose_roi(volume_path: Path, request: RoiRequest, *, section_z_um: float) -> _Roi:
    """The ROI centre in the sample frame: given, or the largest feature the section plane cuts."""
    if request.feature == "coordinates":
        if None in (request.x_um, request.y_um, request.z_um):
            raise HandoffError("feature='coordinates' needs x_um, y_um and z_um")
        return _Roi(np.array([request.x_um, request.y_um, request.z_um], dtype=float), None, None)
    with h5py.File(volume_path, "r") as f:
        volume = f["/entry/data/data"][()]
        z = f["/entry/data/z"][()]
        x = f["/entry/data/x"][()]
    polarity: Literal["dark", "bright"] = "dark" if request.feature == "largest_pore" else "bright"
    matrix_features = detect_volume_features(
        volume,
        voxel_size_um=float(abs(x[1] - x[0])),
        z_offset_um=float((z[0] + z[-1]) / 2),
        polarity=polarity,
        # Fiducials (~30x the matrix) are markers, not features of the material.
        exclude_above=None if polarity == "dark" else 8.0 * float(np.median(volume[volume > 0])),
    )
    cut: list[VolumeFeature] = [
        f for f in matrix_features if abs(float(f.centroid_um[2]) - section_z_um) < 0.8 * f.equivalent_radius_um
    ]
    if not cut:
        raise HandoffError(
            f"none of the {len(matrix_features)} {polarity} features found in the volume crosses the sectioned "
            f"plane at z={section_z_um:.1f} um: the microscope cannot see them"
        )
    chosen = cut[0]  # detect_volume_features sorts largest first
    return _Roi(np.asarray(chosen.centroid_um, dtype=float), float(chosen.equivalent_radius_um), polarity)


def locate_in_micrograph(
    image: np.ndarray, *, pixel_size_um: float, radius_um: float, polarity: Literal["dark", "bright"]
) -> np.ndarray | None:
    """Offset (x, y) in um of the blob of this size nearest the image centre, or None if none is seen."""
    try:
        blobs = detect_fiducials(
            image, pixel_size_um=pixel_size_um, radius_um=radius_um, polarity=polarity, size_tolerance=0.6, min_snr=3.0
        )
    except (RegistrationError, ValueError):
        return None
    if len(blobs) == 0:
        return None
    rows, cols = image.shape
    offsets = (np.asarray(blobs) - [(cols - 1) / 2, (rows - 1) / 2]) * pixel_size_um
    return offsets[int(np.argmin(np.hypot(offsets[:, 0], offsets[:, 1])))]


def hand_off(
    settings: Settings,
    sample: Sample,
    volume_path: Path,
    registration: RegisteredMicrograph,
    request: RoiRequest,
    *,
    parent_uids: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Choose the ROI, drive the microscope there, image it and measure where it landed.

    Returns the fields of :class:`~corrflow.flows.models.HandoffResult` (all but its catalog key).
    The hand-off micrographs record ``parent_uids`` (the tomography run) in their references.
    """
    roi = choose_roi(volume_path, request, section_z_um=registration.section_z_um)
    sample_from_microscope = np.asarray(registration.sample_from_microscope)
    target = microscope_target(
        roi.centre_um,
        sample_from_microscope=sample_from_microscope,
        max_out_of_plane_um=roi.radius_um if roi.radius_um is not None else None,
    )
    stage = np.array([target.stage_x_um, target.stage_y_um])
    runs: list[str] = []
    offsets: list[np.ndarray | None] = []
    errors: list[float | None] = []
    passes = 2 if (request.centre_on_feature and roi.radius_um is not None) else 1
    for attempt in range(passes):
        acquired = run_micrograph(
            settings,
            sample,
            MicrographRequest(stage_x_um=float(stage[0]), stage_y_um=float(stage[1])),
            parent_uids=parent_uids,
        )
        runs.append(acquired.run_uid)
        offset = None
        if roi.radius_um is not None and roi.polarity is not None:
            image = load_micrograph(settings, acquired.run_uid)
            # The plane cuts the feature off-centre in general: its section is at most the feature's radius.
            section_radius = float(np.sqrt(max(roi.radius_um**2 - target.out_of_plane_um**2, (0.5 * roi.radius_um) ** 2)))
            offset = locate_in_micrograph(
                image.image, pixel_size_um=image.pixel_size_um, radius_um=section_radius, polarity=roi.polarity
            )
        offsets.append(offset)
        errors.append(_true_error(settings, roi, stage) if settings.microscope.mode == "sim" else None)
        if attempt + 1 < passes:
            if offset is None:
                break  # nothing seen to centre on: report the first pass only
            # Image columns run along stage +x and rows along stage +y (the micrograph's geometry).
            stage = stage + offset

    def _norm(o: np.ndarray | None) -> float | None:
        return None if o is None else float(np.hypot(*o))

    return {
        "roi_sample_um": tuple(float(v) for v in roi.centre_um),
        "roi_radius_um": roi.radius_um,
        "stage_x_um": float(stage[0]),
        "stage_y_um": float(stage[1]),
        "micrograph_run_uids": runs,
        "first_pass_offset_um": _norm(offsets[0]),
        "first_pass_true_error_um": errors[0],
        "observed_offset_um": _norm(offsets[-1]),
        "true_error_um": errors[-1],
    }


def _true_error(settings: Settings, roi: _Roi, stage_xy_um: np.ndarray) -> float | None:
    """Commanded stage position vs the one that centres the true feature through the true transform."""
    from corrflow.simulators.world import SimulatedWorld

    world = SimulatedWorld(settings.simulation)
    kind = {"dark": "pore", "bright": "precipitate"}.get(roi.polarity or "", None)
    if kind is None:
        true_centre = roi.centre_um  # given coordinates: the truth of the point is the point itself
    else:
        centres = np.array([f.center_um for f in world.phantom().features_of_kind(kind)])
        true_centre = centres[int(np.argmin(np.linalg.norm(centres - roi.centre_um, axis=1)))]
    ideal = transforms.apply(transforms.invert(world.sample_from_microscope), true_centre)
    return float(np.hypot(ideal[0] - stage_xy_um[0], ideal[1] - stage_xy_um[1]))


def handoff_stage(
    settings: Settings,
    request: ExperimentRequest,
    *,
    tomography: TomographyRun,
    volume_shipment: ShippedVolume,
    registration: RegisteredMicrograph,
) -> HandoffResult:
    """Find the chosen feature of the X-ray volume on the microscope; catalogue where it landed.

    The result is ``/processed/<run uid>-handoff``, a child of the registration product, of the
    tomography run and of the hand-off micrographs (themselves children of the tomography run).
    """
    uid = tomography.run_uid
    progress.report("ROI hand-off", 0, 1)
    fields = hand_off(
        settings, request.sample, volume_shipment.file.local_path(settings), registration, request.roi, parent_uids=(uid,)
    )
    key = product_key(uid, "handoff")
    result = HandoffResult(catalog_key=key, **fields)
    with open_catalog(settings) as catalog:
        record_product(
            catalog,
            key,
            {
                "kind": "roi-handoff",
                "parent_run_uids": [uid, *result.micrograph_run_uids],
                "parents": {"registration": registration.catalog_key},
                "request": request.roi.model_dump(mode="json"),
                **result.model_dump(mode="json", exclude={"catalog_key"}),
            },
        )
    progress.report("ROI hand-off", 1, 1)
    print(
        f"ROI at {np.round(result.roi_sample_um, 1).tolist()} um -> stage ({result.stage_x_um:.1f}, "
        f"{result.stage_y_um:.1f}) um; seen {result.observed_offset_um} um from the image centre"
    )
    return result
