"""Scanning electron microscope imaging a polished section through the sample (backscatter-like contrast).

Pixel ``(r, c)`` images the microscope-stage point
``(stage_x_um + (c - (cols-1)/2) * px, stage_y_um + (r - (rows-1)/2) * px, 0)``; the true
``sample_from_microscope`` similarity maps it into ``beamline_sample``, where the phantom's SEM contrast is
evaluated (its z translation is the height of the sectioned plane). The signal is averaged over each pixel,
blurred by the probe (Gaussian), multiplied by a fixed smooth detector-geometry shading, and given shot
noise from ``electrons_per_px`` detected electrons at full signal.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
from numpy.typing import NDArray

from corrflow.processing.transforms import apply
from corrflow.simulators.phantom import Phantom

__all__ = ["MicroscopeModel", "microscope_image", "microscope_pixel_points_um"]


@dataclass(frozen=True, eq=False)
class MicroscopeModel:
    """An SEM with a backscatter detector.

    (Compared by identity: it holds an array, which has no single truth value for ``==``.)

    Attributes
    ----------
    shape_px
        ``(rows, cols)``.
    pixel_size_um
        Pixel size in the microscope stage frame (um).
    sample_from_microscope
        True 4x4 transform from ``microscope_stage`` to ``beamline_sample`` (ground truth).
    blur_sigma_px
        Probe blur, Gaussian standard deviation (px).
    electrons_per_px
        Detected electrons per pixel at signal 1 (sets the shot noise).
    seed
        Seed of the fixed detector shading (a gentle linear brightness gradient, +-4 %, as the
        off-axis backscatter detector gives).
    supersample
        Sub-samples per pixel edge over which the section is averaged.
    """

    shape_px: tuple[int, int]
    pixel_size_um: float
    sample_from_microscope: np.ndarray
    blur_sigma_px: float = 1.0
    electrons_per_px: float = 200.0
    seed: int = 0
    supersample: int = 2

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape_px)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape_px must be (rows, cols) of positive integers, got {self.shape_px!r}")
        object.__setattr__(self, "shape_px", shape)
        matrix = np.array(self.sample_from_microscope, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
            raise ValueError("sample_from_microscope must be a 4x4 homogeneous transform")
        matrix.setflags(write=False)
        object.__setattr__(self, "sample_from_microscope", matrix)
        for name in ("pixel_size_um", "electrons_per_px"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not (math.isfinite(self.blur_sigma_px) and self.blur_sigma_px >= 0):
            raise ValueError(f"blur_sigma_px must be a non-negative finite number, got {self.blur_sigma_px}")
        if int(self.supersample) != self.supersample or self.supersample < 1:
            raise ValueError(f"supersample must be a positive integer, got {self.supersample}")

    def shading(self) -> NDArray[np.float32]:
        """Fixed relative detector response, shape ``(rows, cols)``, float32 (mean 1); a fresh copy."""
        return _shading(self.shape_px, int(self.seed)).copy()


@functools.lru_cache(maxsize=16)
def _shading(shape_px: tuple[int, int], seed: int) -> NDArray[np.float32]:
    rows, cols = shape_px
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5150]))
    direction = rng.uniform(0, 2 * np.pi)
    y = (np.arange(rows) - (rows - 1) / 2)[:, None] / max(rows, cols)
    x = (np.arange(cols) - (cols - 1) / 2)[None, :] / max(rows, cols)
    out = (1.0 + 0.08 * (np.cos(direction) * x + np.sin(direction) * y)).astype(np.float32)
    out.setflags(write=False)
    return out


def microscope_pixel_points_um(
    model: MicroscopeModel, *, stage_x_um: float, stage_y_um: float, supersample: int = 1
) -> NDArray[np.float64]:
    """Microscope-stage-frame points of the pixel grid, shape ``(rows*s, cols*s, 3)`` (um), z = 0.

    With ``supersample = s > 1`` each pixel is split into ``s x s`` sub-pixel centres (row-major blocks).
    """
    rows, cols = model.shape_px
    s = int(supersample)
    sub = (np.arange(s) + 0.5) / s - 0.5
    r = (np.arange(rows)[:, None] + sub[None, :]).ravel()
    c = (np.arange(cols)[:, None] + sub[None, :]).ravel()
    px = model.pixel_size_um
    xs = stage_x_um + (c - (cols - 1) / 2) * px
    ys = stage_y_um + (r - (rows - 1) / 2) * px
    xx, yy = np.meshgrid(xs, ys)
    return np.stack([xx, yy, np.zeros_like(xx)], axis=-1)


def microscope_image(
    phantom: Phantom, model: MicroscopeModel, *, stage_x_um: float, stage_y_um: float, rng: np.random.Generator
) -> NDArray[np.float32]:
    """A backscatter-like image of the sectioned plane, shape ``(rows, cols)``, float32.

    Values are detected electrons divided by ``electrons_per_px`` (so about the SEM contrast in [0, 1]):
    pores dark, Si phase darker than the matrix, Fe-rich precipitates bright, Cu fiducials brightest.

    Parameters
    ----------
    phantom
        The sample.
    model
        The microscope, including the true ``sample_from_microscope``.
    stage_x_um, stage_y_um
        Microscope stage position (um) imaged at the image centre.
    rng
        Shot-noise generator.
    """
    for name, value in (("stage_x_um", stage_x_um), ("stage_y_um", stage_y_um)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    rows, cols = model.shape_px
    s = int(model.supersample)
    stage_points = microscope_pixel_points_um(model, stage_x_um=stage_x_um, stage_y_um=stage_y_um, supersample=s)
    sample_points = apply(model.sample_from_microscope, stage_points.reshape(-1, 3))
    signal = phantom.sem_contrast_at(sample_points).astype(np.float64).reshape(rows, s, cols, s).mean(axis=(1, 3))
    if model.blur_sigma_px > 0:
        signal = scipy.ndimage.gaussian_filter(signal, model.blur_sigma_px, mode="nearest")
    expected = model.electrons_per_px * signal * model.shading()
    return (rng.poisson(expected) / model.electrons_per_px).astype(np.float32)
