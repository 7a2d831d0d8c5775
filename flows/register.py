"""Registration flow: put a micrograph into the X-ray volume's frame.

The micrograph is read back through the catalog; the sectioned plane is searched around its
nominal height, and the slice whose fiducials fit best wins. A fit that does not pass the
residual threshold is a failure, never a silently wrong transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from corrflow.report import progress
from corrflow.catalog.tiled import open_catalog, product_key, record_product
from corrflow.flows.models import ExperimentRequest, MicrographRun, RegisteredMicrograph, ShippedVolume, TomographyRun
from corrflow.processing import transforms
from corrflow.processing.registration import RegistrationError, RegistrationResult, register_microscope_to_slice
from corrflow.processing.section_height import estimate_section_height, micrograph_on_slice_grid
from corrflow.config.settings import Settings


@dataclass(frozen=True)
class Micrograph:
    image: NDArray[np.float32]
    pixel_size_um: float
    stage_x_um: float
    stage_y_um: float
    run_uid: str


def load_micrograph(settings: Settings, run_uid: str) -> Micrograph:
    """The image and its geometry (pixel size, stage position at the image centre) from the catalog."""
    with open_catalog(settings) as catalog:
        run = catalog.runs[run_uid]
        primary = run["primary"]
        keys = list(primary)
        image_key = next(k for k in keys if k.endswith("_image"))
        detector = image_key[: -len("_image")]
        image = np.asarray(primary[image_key].read())[0].astype(np.float32)
        stage_x = float(np.asarray(primary[next(k for k in keys if k.endswith("stage_x"))].read())[0])
        stage_y = float(np.asarray(primary[next(k for k in keys if k.endswith("stage_y"))].read())[0])
        configuration = primary.descriptors[0]["configuration"][detector]["data"]
        pixel_size_um = float(configuration[f"{detector}_pixel_size_um"])
    return Micrograph(image, pixel_size_um, stage_x, stage_y, run_uid)


@dataclass(frozen=True)
class VolumeRegistration:
    """The in-plane fit and the refined height of the sectioned plane."""

    fit: RegistrationResult
    slice_index: int
    section_z_um: float
    sample_from_microscope: NDArray[np.float64]  # the fit, with z translation = section_z_um


def register_to_volume(
    micrograph: Micrograph,
    volume_path: Path,
    *,
    nominal_section_z_um: float,
    search_half_width_voxels: int = 3,
    fiducial_radius_um: float = 16.0,
) -> VolumeRegistration:
    """Register the micrograph to the volume near the nominal section height.

    1. In-plane: fiducial registration against each slice in the window; the slice with the most
       matched fiducials (then the lowest residual) wins.
    2. Height: the micrograph, resampled through that fit, is correlated with the slices in the
       window; a parabola through the peak gives the plane's height to a fraction of a voxel.

    Raises
    ------
    RegistrationError
        If no slice in the search window gives a fit that passes the residual threshold.
    """
    with h5py.File(volume_path, "r") as f:
        z_um = np.asarray(f["/entry/data/z"][()], dtype=np.float64)
        x_um = np.asarray(f["/entry/data/x"][()], dtype=np.float64)
        voxel_um = float(abs(x_um[1] - x_um[0]))
        centre = int(np.argmin(np.abs(z_um - nominal_section_z_um)))
        lo, hi = max(0, centre - search_half_width_voxels), min(len(z_um), centre + search_half_width_voxels + 1)
        window = np.asarray(f["/entry/data/data"][lo:hi])
    best: tuple[RegistrationResult, int] | None = None
    failures = []
    for k in range(lo, hi):
        try:
            result = register_microscope_to_slice(
                micrograph.image,
                micrograph_pixel_size_um=micrograph.pixel_size_um,
                stage_x_um=micrograph.stage_x_um,
                stage_y_um=micrograph.stage_y_um,
                slice_image=window[k - lo],
                slice_voxel_size_um=voxel_um,
                slice_z_um=float(z_um[k]),
                fiducial_radius_um=fiducial_radius_um,
            )
        except RegistrationError as exc:
            failures.append(f"slice {k} (z={z_um[k]:.1f} um): {exc}")
            continue
        if best is None or (-result.n_matches, result.rms_residual_um) < (-best[0].n_matches, best[0].rms_residual_um):
            best = (result, k)
    if best is None:
        raise RegistrationError(
            f"no slice within +-{search_half_width_voxels} voxels of z={nominal_section_z_um} um registers:\n  "
            + "\n  ".join(failures)
        )
    fit, k = best
    registered = micrograph_on_slice_grid(
        micrograph.image,
        sample_from_microscope=fit.sample_from_microscope,
        micrograph_pixel_size_um=micrograph.pixel_size_um,
        stage_x_um=micrograph.stage_x_um,
        stage_y_um=micrograph.stage_y_um,
        slice_shape=window.shape[1:],
        voxel_size_um=voxel_um,
        slice_z_um=float(z_um[k]),
    )
    if hi - lo >= 3:
        height = estimate_section_height(registered, window, z_um[lo:hi]).z_um
    else:
        height = float(z_um[k])
    refined = np.array(fit.sample_from_microscope, dtype=np.float64)
    refined[2, 3] = height
    return VolumeRegistration(fit=fit, slice_index=k, section_z_um=height, sample_from_microscope=refined)


def registration_stage(
    settings: Settings,
    request: ExperimentRequest,
    *,
    tomography: TomographyRun,
    volume_shipment: ShippedVolume,
    micrograph: MicrographRun,
) -> RegisteredMicrograph:
    """Register the micrograph into the frame of the microscope site's copy of the X-ray volume.

    The transform, the method, its residual and the matched fiducials are catalogued as
    ``/processed/<run uid>-registration``, a child of the tomography and the micrograph runs and of
    the volume product.
    """
    uid = tomography.run_uid
    progress.report("register", 0, 1)
    image = load_micrograph(settings, micrograph.run_uid)
    volume_path = volume_shipment.file.local_path(settings)
    print(f"registering micrograph {micrograph.run_uid} into {volume_path.resolve()} (sha256 {volume_shipment.sha256})")
    registration = register_to_volume(image, volume_path, nominal_section_z_um=request.registration.section_z_um)
    fit = registration.fit
    progress.report("register", 1, 1, detail=f"{fit.n_matches} fiducials, {fit.rms_residual_um:.2f} um RMS")
    print(
        f"section at z={registration.section_z_um:.2f} um (slice {registration.slice_index}): scale {fit.scale:.4f}, "
        f"rotation {fit.rotation_deg:.3f} deg, residual {fit.rms_residual_um:.2f} um over {fit.n_matches} fiducials"
    )
    matrix = registration.sample_from_microscope
    key = product_key(uid, "registration")
    result = RegisteredMicrograph(
        catalog_key=key,
        method="fiducials",
        sample_from_microscope=transforms.to_list(matrix),
        scale=fit.scale,
        rotation_deg=fit.rotation_deg,
        translation_um=(float(matrix[0, 3]), float(matrix[1, 3]), float(matrix[2, 3])),
        rms_residual_um=fit.rms_residual_um,
        n_matches=fit.n_matches,
        slice_index=registration.slice_index,
        section_z_um=registration.section_z_um,
        matched_fiducials_um=[(float(x), float(y)) for x, y in fit.sample_points_um],
    )
    with open_catalog(settings) as catalog:
        record_product(
            catalog,
            key,
            {
                "kind": "registration",
                "parent_run_uids": [uid, micrograph.run_uid],
                "micrograph_run_uid": micrograph.run_uid,
                "parents": {"volume": product_key(uid, "volume")},
                "frames": {"from": settings.microscope.frame, "to": settings.beamline.frame},
                "volume": {"path": str(volume_path.resolve()), "sha256": volume_shipment.sha256},
                **result.model_dump(mode="json", exclude={"catalog_key"}),
            },
        )
    return result
