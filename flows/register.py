"""Registration flow: put a micrograph into the X-ray volume's frame.

The micrograph is read back through the catalog and registered by the method the request names
(:class:`~corrflow.flows.models.RegistrationParameters`):

* ``fiducials``: the sectioned plane is searched around its nominal height, and the slice whose
  fiducials fit best wins; quality: the RMS fiducial residual (um);
* ``intensity``: mutual-information registration to the slice at the nominal height, then the
  height refined as for the fiducials; quality: the normalized mutual information;
* ``slice_in_volume``: the (possibly tilted) plane of the volume that the micrograph shows; quality:
  the normalized mutual information;
* ``auto``: fiducials, then slice-in-volume, then intensity (:data:`AUTO_ORDER`); the first result
  that passes its quality check wins, and every attempt is recorded with why it was rejected.

The two mutual-information methods are also checked against the fiducials wherever fiducials are
matched between the micrograph and the volume. A fit that does not pass its method's quality check
is a failure (:class:`RegistrationError`), never a silently wrong transform.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from numpy.typing import NDArray

from corrflow.report import progress
from corrflow.catalog.tiled import open_catalog, product_key, record_product
from corrflow.flows.models import (
    ExperimentRequest,
    MicrographRun,
    RegisteredMicrograph,
    RegistrationParameters,
    ShippedVolume,
    TomographyRun,
)
from corrflow.processing import transforms
from corrflow.processing.intensity_registration import register_intensity
from corrflow.processing.registration import RegistrationError, RegistrationResult, register_microscope_to_slice
from corrflow.processing.section_height import estimate_section_height, micrograph_on_slice_grid
from corrflow.processing.slice_in_volume import find_slice_in_volume
from corrflow.config.settings import Settings

Method = Literal["fiducials", "intensity", "slice_in_volume"]
Quality = RegisteredMicrograph.Quality
Attempt = RegisteredMicrograph.Attempt

AUTO_ORDER: tuple[Method, ...] = ("fiducials", "slice_in_volume", "intensity")
"""What ``method="auto"`` tries, in order: the fiducials (most accurate where they are seen), then the
methods that need no markers, the one that also finds the plane's tilt first."""


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


@dataclass(frozen=True)
class _VolumeWindow:
    """Consecutive slices of the volume around a height, with their heights and the voxel size."""

    slices: NDArray[np.float32]  # (n, ny, nx)
    z_um: NDArray[np.float64]  # (n,), heights of the slices
    lo: int  # index of the first slice in the volume
    centre: int  # index (in the volume) of the slice nearest the requested height
    voxel_um: float


def _read_window(volume_path: Path, *, z_um: float, half_width_voxels: int) -> _VolumeWindow:
    """The slices within ``half_width_voxels`` of the one nearest ``z_um`` (only these are read: a volume
    need not fit in memory)."""
    with h5py.File(volume_path, "r") as f:
        heights = np.asarray(f["/entry/data/z"][()], dtype=np.float64)
        x_um = np.asarray(f["/entry/data/x"][()], dtype=np.float64)
        voxel_um = float(abs(x_um[1] - x_um[0]))
        centre = int(np.argmin(np.abs(heights - z_um)))
        lo, hi = max(0, centre - half_width_voxels), min(len(heights), centre + half_width_voxels + 1)
        slices = np.asarray(f["/entry/data/data"][lo:hi])
    return _VolumeWindow(slices=slices, z_um=heights[lo:hi], lo=lo, centre=centre, voxel_um=voxel_um)


def _refined_height(micrograph: Micrograph, window: _VolumeWindow, *, sample_from_microscope: NDArray[np.float64],
                    k: int) -> tuple[float, bool]:
    """Height (um) of the sectioned plane: the micrograph, resampled through an in-plane fit made on slice ``k``
    (volume index), correlated with the slices of the window; a parabola through the peak gives the height to a
    fraction of a voxel (with fewer than 3 slices: slice ``k``'s height). The flag says that the correlation
    peaked at the first or last slice of the window, where the true plane may lie beyond it."""
    registered = micrograph_on_slice_grid(
        micrograph.image,
        sample_from_microscope=sample_from_microscope,
        micrograph_pixel_size_um=micrograph.pixel_size_um,
        stage_x_um=micrograph.stage_x_um,
        stage_y_um=micrograph.stage_y_um,
        slice_shape=window.slices.shape[1:],
        voxel_size_um=window.voxel_um,
        slice_z_um=float(window.z_um[k - window.lo]),
    )
    if len(window.z_um) >= 3:
        height = estimate_section_height(registered, window.slices, window.z_um)
        return height.z_um, height.peak_index in (0, len(window.z_um) - 1)
    return float(window.z_um[k - window.lo]), False


def register_to_volume(
    micrograph: Micrograph,
    volume_path: Path,
    *,
    nominal_section_z_um: float,
    search_half_width_voxels: int = 3,
    fiducial_radius_um: float = 16.0,
    max_residual_um: float | None = None,
) -> VolumeRegistration:
    """Register the micrograph to the volume near the nominal section height, by its fiducials.

    1. In-plane: fiducial registration against each slice in the window; the slice with the most
       matched fiducials (then the lowest residual) wins.
    2. Height: the micrograph, resampled through that fit, is correlated with the slices in the
       window; a parabola through the peak gives the plane's height to a fraction of a voxel.

    ``max_residual_um`` is the largest accepted RMS fiducial residual (um); None = half a voxel.

    Raises
    ------
    RegistrationError
        If no slice in the search window gives a fit that passes the residual threshold.
    """
    window = _read_window(volume_path, z_um=nominal_section_z_um, half_width_voxels=search_half_width_voxels)
    z_um, lo, hi = window.z_um, window.lo, window.lo + len(window.z_um)
    best: tuple[RegistrationResult, int] | None = None
    failures = []
    for k in range(lo, hi):
        try:
            result = register_microscope_to_slice(
                micrograph.image,
                micrograph_pixel_size_um=micrograph.pixel_size_um,
                stage_x_um=micrograph.stage_x_um,
                stage_y_um=micrograph.stage_y_um,
                slice_image=window.slices[k - lo],
                slice_voxel_size_um=window.voxel_um,
                slice_z_um=float(z_um[k - lo]),
                fiducial_radius_um=fiducial_radius_um,
                max_residual_um=max_residual_um,
            )
        except RegistrationError as exc:
            failures.append(f"slice {k} (z={z_um[k - lo]:.1f} um): {exc}")
            continue
        if best is None or (-result.n_matches, result.rms_residual_um) < (-best[0].n_matches, best[0].rms_residual_um):
            best = (result, k)
    if best is None:
        raise RegistrationError(
            f"no slice within +-{search_half_width_voxels} voxels of z={nominal_section_z_um} um registers:\n  "
            + "\n  ".join(failures)
        )
    fit, k = best
    height, _ = _refined_height(micrograph, window, sample_from_microscope=fit.sample_from_microscope, k=k)
    refined = np.array(fit.sample_from_microscope, dtype=np.float64)
    refined[2, 3] = height
    return VolumeRegistration(fit=fit, slice_index=k, section_z_um=height, sample_from_microscope=refined)


# -- the methods --------------------------------------------------------------------------------
class RejectedRegistration(RegistrationError):
    """A registration refused by its quality check, with the figures it was judged by.

    ``attempts`` holds every method tried where ``method="auto"`` found none acceptable.
    """

    def __init__(self, message: str, *, quality: Quality | None = None, checks: tuple[Quality, ...] = (),
                 attempts: tuple[Attempt, ...] = ()) -> None:
        super().__init__(message)
        self.quality = quality
        self.checks = checks
        self.attempts = attempts


@dataclass(frozen=True)
class MethodRegistration:
    """One method's accepted registration of the micrograph into the volume.

    ``sample_from_microscope`` is 4x4 (um), its z translation the plane's height at the stage origin;
    ``section_z_um`` the height of the sectioned plane (um, at the micrograph's centre for a tilted plane);
    ``slice_index`` the volume slice the in-plane fit was made on (fiducials) or the one nearest the section
    (the others). ``rms_residual_um``, ``n_matches`` and
    ``matched_fiducials_um`` (sample frame, um, ``(n, 2)``) are the fiducials matched between micrograph
    and volume and their RMS distance after this transform (None: none matched).
    """

    method: Method
    sample_from_microscope: NDArray[np.float64]
    section_z_um: float
    slice_index: int
    scale: float
    rotation_deg: float
    quality: Quality
    checks: tuple[Quality, ...]
    rms_residual_um: float | None
    n_matches: int
    matched_fiducials_um: NDArray[np.float64]
    summary: str


def _kernel_default(kernel: Callable[..., Any], name: str) -> float:
    """The default of a kernel's keyword ``name``: the limit applied where the request leaves it empty."""
    return float(inspect.signature(kernel).parameters[name].default)


def _register_by_fiducials(micrograph: Micrograph, volume_path: Path,
                           parameters: RegistrationParameters) -> MethodRegistration:
    registration = register_to_volume(
        micrograph, volume_path, nominal_section_z_um=parameters.section_z_um,
        search_half_width_voxels=parameters.search_half_width_voxels,
        fiducial_radius_um=parameters.fiducial_radius_um, max_residual_um=parameters.max_residual_um,
    )
    fit = registration.fit
    return MethodRegistration(
        method="fiducials",
        sample_from_microscope=registration.sample_from_microscope,
        section_z_um=registration.section_z_um,
        slice_index=registration.slice_index,
        scale=fit.scale,
        rotation_deg=fit.rotation_deg,
        quality=Quality(name="rms_residual", value=fit.rms_residual_um, unit="um", upper_limit=fit.max_residual_um),
        checks=(Quality(name="matched_fiducials", value=fit.n_matches, unit="count",
                        lower_limit=_kernel_default(register_microscope_to_slice, "min_matches")),),
        rms_residual_um=fit.rms_residual_um,
        n_matches=fit.n_matches,
        matched_fiducials_um=np.asarray(fit.sample_points_um, dtype=np.float64).reshape(-1, 2),
        summary=fit.message,
    )


@dataclass(frozen=True)
class _FiducialCheck:
    n_matches: int
    rms_um: float | None  # None: no fiducials matched
    sample_points_um: NDArray[np.float64]  # (n_matches, 2)
    note: str


def _fiducial_check(micrograph: Micrograph, window: _VolumeWindow, *, k: int, fiducial_radius_um: float,
                    sample_from_microscope: NDArray[np.float64]) -> _FiducialCheck:
    """Fiducials matched between the micrograph and slice ``k`` (volume index) by the fiducial kernel, and their
    RMS distance (um, in the slice's plane) after ``sample_from_microscope``: an independent check of a
    mutual-information result. Where too few fiducials are seen to match, there is no check (``rms_um`` None)."""
    try:
        fit = register_microscope_to_slice(
            micrograph.image,
            micrograph_pixel_size_um=micrograph.pixel_size_um,
            stage_x_um=micrograph.stage_x_um,
            stage_y_um=micrograph.stage_y_um,
            slice_image=window.slices[k - window.lo],
            slice_voxel_size_um=window.voxel_um,
            slice_z_um=float(window.z_um[k - window.lo]),
            fiducial_radius_um=fiducial_radius_um,
            raise_on_failure=False,  # only the pairs are used: their own fit's residual does not matter here
        )
    except RegistrationError as exc:
        return _FiducialCheck(0, None, np.empty((0, 2)), f"no fiducial check ({exc})")
    stage = np.column_stack([fit.microscope_points_um, np.zeros(len(fit.microscope_points_um))])
    mapped = transforms.apply(sample_from_microscope, stage)[:, :2]
    distance = np.linalg.norm(mapped - fit.sample_points_um, axis=1)
    rms = float(np.sqrt(np.mean(distance**2)))
    return _FiducialCheck(fit.n_matches, rms, np.asarray(fit.sample_points_um, dtype=np.float64),
                          f"{fit.n_matches} fiducials matched, {rms:.2f} um RMS from where this transform puts them")


def _mutual_information_quality(
    method: Method, parameters: RegistrationParameters, *, kernel: Callable[..., Any], nmi: float, significance: float,
    overlap: float, ok: bool, message: str,
) -> tuple[Quality, list[Quality]]:
    """The kernel's quality check of a mutual-information result (NMI, its significance, the overlap) as
    figures; raises :class:`RejectedRegistration` where the kernel did not accept it."""

    def limit(value: float | None, name: str) -> float:
        return _kernel_default(kernel, name) if value is None else value

    quality = Quality(name="normalized_mutual_information", value=nmi, unit="1",
                      lower_limit=limit(parameters.min_nmi, "min_nmi"))
    checks = [Quality(name="overlap_fraction", value=overlap, unit="1",
                      lower_limit=_kernel_default(kernel, "min_overlap"))]
    if np.isfinite(significance):  # NaN: no misplaced copy overlapped enough to compare (the kernel refuses it)
        checks.insert(0, Quality(name="nmi_significance", value=significance, unit="sigma",
                                 lower_limit=limit(parameters.min_significance_sigma, "min_significance")))
    if not ok:
        raise RejectedRegistration(f"{method} registration rejected: {message}", quality=quality, checks=tuple(checks))
    return quality, checks


def _checked_against_fiducials(
    method: Method, micrograph: Micrograph, window: _VolumeWindow, parameters: RegistrationParameters, *,
    matrix: NDArray[np.float64], section_z_um: float, quality: Quality, checks: list[Quality], message: str,
) -> MethodRegistration:
    """A mutual-information result that passed its own check, checked against the fiducials where they are
    matched on the slice nearest the section; raises :class:`RejectedRegistration` where it disagrees."""
    k = window.lo + int(np.argmin(np.abs(window.z_um - section_z_um)))
    check = _fiducial_check(micrograph, window, k=k, fiducial_radius_um=parameters.fiducial_radius_um,
                            sample_from_microscope=matrix)
    checks = list(checks)
    if check.rms_um is not None:
        largest = window.voxel_um if parameters.fiducial_check_um is None else parameters.fiducial_check_um
        checks.append(Quality(name="fiducial_rms_residual", value=check.rms_um, unit="um", upper_limit=largest))
        if check.rms_um > largest:
            raise RejectedRegistration(
                f"{method} registration rejected: it disagrees with the fiducials ({check.note}, limit "
                f"{largest:.2f} um); {message}", quality=quality, checks=tuple(checks),
            )
    similarity = transforms.decompose_similarity(matrix)
    return MethodRegistration(
        method=method, sample_from_microscope=matrix, section_z_um=float(section_z_um), slice_index=k,
        scale=similarity.scale, rotation_deg=similarity.rotation_deg, quality=quality, checks=tuple(checks),
        rms_residual_um=check.rms_um, n_matches=check.n_matches, matched_fiducials_um=check.sample_points_um,
        summary=f"{message}; {check.note}",
    )


def _mi_limits(parameters: RegistrationParameters) -> dict[str, float]:
    limits = {"min_nmi": parameters.min_nmi, "min_significance": parameters.min_significance_sigma}
    return {name: value for name, value in limits.items() if value is not None}


def _register_by_intensity(micrograph: Micrograph, volume_path: Path,
                           parameters: RegistrationParameters) -> MethodRegistration:
    window = _read_window(volume_path, z_um=parameters.section_z_um,
                          half_width_voxels=parameters.search_half_width_voxels)
    k = window.centre
    result = register_intensity(
        window.slices[k - window.lo], micrograph.image,
        fixed_pixel_size_um=window.voxel_um, moving_pixel_size_um=micrograph.pixel_size_um,
        moving_center_um=(micrograph.stage_x_um, micrograph.stage_y_um),
        # The stage's calibration is known to a few per cent only: the scale is fitted, not assumed.
        model="similarity", rotation_range_deg=parameters.rotation_range_deg, raise_on_failure=False,
        **_mi_limits(parameters),
    )
    quality, checks = _mutual_information_quality(
        "intensity", parameters, kernel=register_intensity, nmi=result.nmi, significance=result.significance,
        overlap=result.overlap_fraction, ok=result.ok, message=result.message,
    )
    matrix = result.as_4x4(z_um=float(window.z_um[k - window.lo]))
    try:
        height, at_edge = _refined_height(micrograph, window, sample_from_microscope=matrix, k=k)
    except ValueError as exc:  # the resampled micrograph shows no sample to compare heights with
        raise RejectedRegistration(f"intensity registration: the section height cannot be refined ({exc})",
                                   quality=quality, checks=tuple(checks)) from exc
    if at_edge:
        # A 2-D fit knows no height: one found at the edge of the window is no estimate (the plane may lie
        # beyond it, or the contrasts disagree in rank, e.g. fiducials pulled out in polishing).
        raise RejectedRegistration(
            f"intensity registration rejected: the section height ({height:.2f} um) is at the edge of the slices "
            f"searched, +-{parameters.search_half_width_voxels} voxels around z={parameters.section_z_um} um; "
            f"{result.message}", quality=quality, checks=tuple(checks),
        )
    matrix[2, 3] = height
    return _checked_against_fiducials(
        "intensity", micrograph, window, parameters, matrix=matrix, section_z_um=height, quality=quality,
        checks=checks, message=f"{result.message}; section height {height:.2f} um",
    )


# Slices read beyond the searched heights for slice-in-volume: its search slabs (6 voxels), the retry's tilted
# slabs and its final local refinement reach a few voxels above and below the plane.
_SLICE_IN_VOLUME_MARGIN_VOXELS = 8
_SLICE_IN_VOLUME_MIN_SLICES = 8  # the kernel's least volume thickness


def _register_slice_in_volume(micrograph: Micrograph, volume_path: Path,
                              parameters: RegistrationParameters) -> MethodRegistration:
    half = parameters.search_half_width_voxels
    window = _read_window(volume_path, z_um=parameters.section_z_um,
                          half_width_voxels=half + _SLICE_IN_VOLUME_MARGIN_VOXELS)
    if len(window.z_um) < _SLICE_IN_VOLUME_MIN_SLICES:
        raise RegistrationError(
            f"slice-in-volume registration needs at least {_SLICE_IN_VOLUME_MIN_SLICES} slices, the volume has "
            f"{len(window.z_um)}"
        )
    nominal, voxel = parameters.section_z_um, window.voxel_um
    result = find_slice_in_volume(
        window.slices, micrograph.image, voxel_size_um=voxel, image_pixel_size_um=micrograph.pixel_size_um,
        z_offset_um=float((window.z_um[0] + window.z_um[-1]) / 2),
        image_center_um=(micrograph.stage_x_um, micrograph.stage_y_um),
        model="similarity",  # as for intensity: the scale is fitted
        height_range_um=(nominal - half * voxel, nominal + half * voxel),
        rotation_range_deg=parameters.rotation_range_deg, max_tilt_deg=parameters.max_tilt_deg,
        raise_on_failure=False, **_mi_limits(parameters),
    )
    quality, checks = _mutual_information_quality(
        "slice_in_volume", parameters, kernel=find_slice_in_volume, nmi=result.nmi, significance=result.significance,
        overlap=result.overlap_fraction, ok=result.ok, message=result.message,
    )
    return _checked_against_fiducials(
        "slice_in_volume", micrograph, window, parameters, matrix=np.array(result.sample_from_image, dtype=np.float64),
        section_z_um=result.plane.height_um, quality=quality, checks=checks, message=result.message,
    )


_METHODS: dict[Method, Callable[[Micrograph, Path, RegistrationParameters], MethodRegistration]] = {
    "fiducials": _register_by_fiducials,
    "intensity": _register_by_intensity,
    "slice_in_volume": _register_slice_in_volume,
}


@dataclass(frozen=True)
class Registration:
    """The accepted registration, the method asked for, and every method tried (the accepted one last)."""

    found: MethodRegistration
    requested_method: Literal["fiducials", "intensity", "slice_in_volume", "auto"]
    attempts: tuple[Attempt, ...]


def register_micrograph(micrograph: Micrograph, volume_path: Path, parameters: RegistrationParameters) -> Registration:
    """Register the micrograph into the volume by ``parameters.method`` ("auto": :data:`AUTO_ORDER`, the first
    result that passes its quality check).

    Raises
    ------
    RegistrationError
        The method's result fails its quality check (or, for "auto", every method's does: a
        :class:`RejectedRegistration` whose ``attempts`` say why each was rejected).
    """
    order = AUTO_ORDER if parameters.method == "auto" else (parameters.method,)
    attempts: list[Attempt] = []
    for method in order:
        try:
            found = _METHODS[method](micrograph, volume_path, parameters)
        except RegistrationError as exc:
            if parameters.method != "auto":
                raise
            attempts.append(Attempt(method=method, accepted=False, quality=getattr(exc, "quality", None),
                                    reason=str(exc)))
            continue
        attempts.append(Attempt(method=method, accepted=True, quality=found.quality, reason=found.summary))
        return Registration(found=found, requested_method=parameters.method, attempts=tuple(attempts))
    raise RejectedRegistration(
        "no method registers the micrograph (auto tried " + ", ".join(order) + "):\n  "
        + "\n  ".join(f"{a.method}: {a.reason}" for a in attempts),
        attempts=tuple(attempts),
    )


def registration_stage(
    settings: Settings,
    request: ExperimentRequest,
    *,
    tomography: TomographyRun,
    volume_shipment: ShippedVolume,
    micrograph: MicrographRun,
) -> RegisteredMicrograph:
    """Register the micrograph into the frame of the microscope site's copy of the X-ray volume.

    The method is ``request.registration.method`` (see :func:`register_micrograph`). The transform,
    the method used and the one asked for, its quality figure and the other checks it passed, the
    matched fiducials and every method tried are catalogued as ``/processed/<run uid>-registration``,
    a child of the tomography and the micrograph runs and of the volume product.

    Raises
    ------
    RegistrationError
        The result fails its method's quality check ("auto": every method's does).
    """
    uid = tomography.run_uid
    progress.report("register", 0, 1)
    image = load_micrograph(settings, micrograph.run_uid)
    volume_path = volume_shipment.file.local_path(settings)
    parameters = request.registration
    print(
        f"registering micrograph {micrograph.run_uid} into {volume_path.resolve()} (sha256 {volume_shipment.sha256}) "
        f"by {parameters.method}"
    )
    registration = register_micrograph(image, volume_path, parameters)
    found = registration.found
    for attempt in registration.attempts[:-1]:
        print(f"{attempt.method} rejected: {attempt.reason}")
    quality = found.quality
    progress.report("register", 1, 1, detail=f"{found.method}, {quality.name} {quality.value:.3f} {quality.unit}")
    residual = "no fiducials matched" if found.rms_residual_um is None else (
        f"residual {found.rms_residual_um:.2f} um over {found.n_matches} fiducials")
    print(
        f"{found.method}: section at z={found.section_z_um:.2f} um (slice {found.slice_index}): "
        f"scale {found.scale:.4f}, rotation {found.rotation_deg:.3f} deg, "
        f"{quality.name} {quality.value:.3f} {quality.unit}, {residual}"
    )
    matrix = found.sample_from_microscope
    key = product_key(uid, "registration")
    result = RegisteredMicrograph(
        catalog_key=key,
        method=found.method,
        sample_from_microscope=transforms.to_list(matrix),
        scale=found.scale,
        rotation_deg=found.rotation_deg,
        translation_um=(float(matrix[0, 3]), float(matrix[1, 3]), float(matrix[2, 3])),
        rms_residual_um=found.rms_residual_um,
        n_matches=found.n_matches,
        slice_index=found.slice_index,
        section_z_um=found.section_z_um,
        matched_fiducials_um=[(float(x), float(y)) for x, y in found.matched_fiducials_um],
        requested_method=registration.requested_method,
        quality=quality,
        checks=list(found.checks),
        attempts=list(registration.attempts),
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
