"""Pure numerical kernels of corrflow: tomography pre-processing, reconstruction, metrics, registration.

Every function is pure (no I/O, no global state), takes options as keywords, validates its inputs at
the edge (``ValueError`` naming the argument) and returns float32 images by default. Geometry follows
docs/GEOMETRY.md ("Geometry conventions"): detector column ``j`` at ``u_j = (j - c) * pixel``, ``c`` the
rotation-axis column; slices ``slice[iy, ix]`` at ``x = (ix - (n-1)/2) * voxel``,
``y = (iy - (n-1)/2) * voxel``; volumes ``(z, y, x)``; attenuation in 1/mm.

Modules
-------
normalize
    Flat/dark correction (one flat set, or flats before AND after interpolated by frame position) and
    the safe ``-ln``: :func:`normalize`, :func:`minus_log`, :func:`line_integrals`.
rings
    Stripe (ring-artefact) removal in sinograms: :func:`remove_stripes_sorting` (Vo et al. 2018).
phase
    Paganin single-distance phase retrieval: :func:`paganin`.
centering
    Rotation-axis column from opposed projections: :func:`find_rotation_center`.
sinogram360
    Full-turn scans: offset-centre (half-acquisition) 360° sinograms -> 180° sinograms of about twice the
    width (:func:`sinogram_360_to_180`), their axis from the data (:func:`find_axis_360`),
    :func:`covers_full_turn`.
fbp
    Filtered back-projection: :func:`fbp` (one slice), :func:`fbp_volume` (a stack of sinograms);
    ``method="gridrec"`` (Fourier, default) or ``"direct"``; ``backend="auto"|"cpu"|"gpu"``.
gpu
    Optional CuPy support: :func:`gpu_available`, :func:`gpu_unavailable_reason`.
resolution
    Fourier ring/shell correlation and half-dataset resolution (van Heel & Schatz 2005 thresholds):
    :func:`fourier_correlation`, :func:`resolution_from_curve`, :func:`half_dataset_resolution`.
metrics
    :func:`rmse`, :func:`nrmse`, :func:`material_means`.
registration
    :func:`detect_fiducials`, :func:`fit_landmarks` (known pairs), :func:`match_landmarks` (unknown pairs),
    :func:`register_microscope_to_slice` (micrograph -> ``beamline_sample`` 4x4 transform);
    failures raise :class:`RegistrationError`.
transforms
    4x4 homogeneous transforms between frames of reference.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The modules `normalize` and `fbp` share their names with their main functions: they are imported
# eagerly so that the package attribute is bound to the FUNCTION after the submodule is loaded (a later
# `import corrflow.processing.fbp` does not rebind it). They only need NumPy and scipy.fft.
from corrflow.processing.centering import find_rotation_center
from corrflow.processing.fbp import BACKENDS, FILTERS, METHODS, fbp, fbp_volume
from corrflow.processing.gpu import gpu_available, gpu_unavailable_reason
from corrflow.processing.metrics import material_means, nrmse, rmse
from corrflow.processing.normalize import line_integrals, minus_log, normalize
from corrflow.processing.phase import paganin
from corrflow.processing.resolution import fourier_correlation, half_dataset_resolution, resolution_from_curve
from corrflow.processing.rings import remove_stripes_sorting
from corrflow.processing.sinogram360 import covers_full_turn, find_axis_360, sinogram_360_to_180

# Registration needs scikit-image and SimpleITK (about a second to import); resolved on first use so
# `from corrflow.processing.transforms import ...` stays cheap for devices and flows.
_LAZY = (
    "LandmarkFit",
    "RegistrationError",
    "RegistrationResult",
    "detect_fiducials",
    "fit_landmarks",
    "match_landmarks",
    "register_microscope_to_slice",
)

if TYPE_CHECKING:
    from corrflow.processing.registration import (
        LandmarkFit,
        RegistrationError,
        RegistrationResult,
        detect_fiducials,
        fit_landmarks,
        match_landmarks,
        register_microscope_to_slice,
    )

__all__ = [
    "BACKENDS",
    "FILTERS",
    "METHODS",
    "covers_full_turn",
    "find_axis_360",
    "fourier_correlation",
    "gpu_available",
    "gpu_unavailable_reason",
    "half_dataset_resolution",
    "paganin",
    "remove_stripes_sorting",
    "resolution_from_curve",
    "LandmarkFit",
    "RegistrationError",
    "RegistrationResult",
    "detect_fiducials",
    "fbp",
    "fbp_volume",
    "find_rotation_center",
    "fit_landmarks",
    "line_integrals",
    "match_landmarks",
    "material_means",
    "minus_log",
    "normalize",
    "nrmse",
    "register_microscope_to_slice",
    "rmse",
    "sinogram_360_to_180",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.registration"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
