"""Synthetic inputs with known ground truth for the registration benchmark (``benchmarks.registration``).

Every generator takes a ``numpy.random.Generator`` and returns the images together with the TRUE
transform, so accuracy is measured against ground truth, never against another implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from corrflow.processing.transforms import similarity
from corrflow.simulators import MicroscopeModel, make_phantom, microscope_image
from corrflow.simulators.microscope import microscope_pixel_points_um
from corrflow.simulators.phantom import Feature, Phantom
from corrflow.processing.transforms import apply

SECTION_PHANTOM_SEED = 7


# ---------------------------------------------------------------------------------------------- translation


def texture_pair(rng: np.random.Generator, *, n: int = 512, snr: float = 10.0, max_shift_px: float = 20.0
                 ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Two non-periodic ``n x n`` crops of one band-limited random texture, the second shifted by a known amount.

    The texture (fine grain, sigma 2 px, plus coarse structure, sigma 8 px) is generated on a larger periodic
    canvas and shifted EXACTLY (Fourier shift of a band-limited field) before both crops are cut from its
    centre: the crops are not periodic and objects are cut at their borders, the case where whitened phase
    correlation fails. Independent white noise gives ``std(signal) / std(noise) = snr`` in each image.

    Returns
    -------
    reference, moving : ndarray, shape (n, n)
    shift_xy_px : ndarray, shape (2,)
        ``moving(p) = reference(p - shift)`` (noise aside).
    """
    big = n + 2 * int(np.ceil(max_shift_px)) + 64
    field = ndimage.gaussian_filter(rng.normal(size=(big, big)), 2.0, mode="wrap")
    field += 4.0 * ndimage.gaussian_filter(rng.normal(size=(big, big)), 8.0, mode="wrap")
    shift = rng.uniform(-max_shift_px, max_shift_px, 2)
    ky = np.fft.fftfreq(big)[:, None]
    kx = np.fft.fftfreq(big)[None, :]
    shifted = np.fft.ifft2(np.fft.fft2(field) * np.exp(-2j * np.pi * (kx * shift[0] + ky * shift[1]))).real
    o = (big - n) // 2
    reference, moving = field[o : o + n, o : o + n], shifted[o : o + n, o : o + n]
    sigma = reference.std() / snr
    return reference + rng.normal(0, sigma, reference.shape), moving + rng.normal(0, sigma, moving.shape), shift


# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SectionCase:
    """An X-ray slice (fixed, sample frame) and a micrograph (moving, microscope stage frame) of one plane."""

    slice_image: NDArray[np.float64]
    slice_pixel_um: float
    micrograph: NDArray[np.float64]
    micrograph_pixel_um: float
    stage_um: NDArray[np.float64]
    true_matrix: NDArray[np.float64]  # 3x3, microscope stage -> sample (in-plane)
    true_4x4: NDArray[np.float64]

    def field_corners_um(self) -> NDArray[np.float64]:
        """Micrograph field corners in the stage frame, shape (4, 2)."""
        rows, cols = self.micrograph.shape
        hx, hy = (cols - 1) / 2 * self.micrograph_pixel_um, (rows - 1) / 2 * self.micrograph_pixel_um
        return np.array([[self.stage_um[0] + sx * hx, self.stage_um[1] + sy * hy] for sx in (-1, 1) for sy in (-1, 1)])

    def field_error_um(self, matrix: NDArray[np.float64]) -> float:
        """Largest distance between true and estimated positions of the micrograph corners (sample frame, µm)."""
        corners = self.field_corners_um()
        truth = corners @ self.true_matrix[:2, :2].T + self.true_matrix[:2, 2]
        estimate = corners @ matrix[:2, :2].T + matrix[:2, 2]
        return float(np.linalg.norm(truth - estimate, axis=1).max())


def xray_section(phantom: Phantom, *, n: int, pixel_um: float, z_um: float, rng: np.random.Generator,
                 noise: float = 0.05, blur_px: float = 0.8, supersample: int = 4) -> NDArray[np.float64]:
    """A reconstruction-like slice: pixel-averaged attenuation (1/mm) at height ``z_um``, blur, noise.

    Values are not clipped: the Cu fiducials (16 1/mm) are 30 times brighter than the matrix, as in a real
    reconstruction. ``supersample`` sub-pixels per axis average each pixel (4: edge positions to ~1/8 px).
    """
    ss = int(supersample)
    g = ((np.arange(n * ss) + 0.5) / ss - 0.5 - (n - 1) / 2) * pixel_um
    mu = np.empty((n, n))
    for row in range(0, n * ss, 64 * ss):  # in bands of rows: bounded memory at 512² x 16 sub-pixels
        xx, yy = np.meshgrid(g, g[row : row + 64 * ss])
        points = np.stack([xx, yy, np.full_like(xx, z_um)], axis=-1)
        band = phantom.attenuation_at(points).astype(np.float64)
        mu[row // ss : row // ss + band.shape[0] // ss] = band.reshape(-1, ss, n, ss).mean(axis=(1, 3))
    mu = ndimage.gaussian_filter(mu, blur_px) if blur_px > 0 else mu
    return mu + rng.normal(0.0, noise, mu.shape)


def section_case(rng: np.random.Generator, *, n: int = 512, field_um: float = 820.0, micro_field_um: float = 600.0,
                 rotation_deg: tuple[float, float] = (-180.0, 180.0), scale: tuple[float, float] = (1.0, 1.0),
                 max_shift_um: float = 40.0, phantom: Phantom | None = None, slice_image=None) -> SectionCase:
    """Random known similarity between a slice of the section plane and an SEM micrograph of it."""
    phantom = phantom if phantom is not None else make_phantom(seed=SECTION_PHANTOM_SEED)
    pixel = field_um / n
    if slice_image is None:
        slice_image = xray_section(phantom, n=n, pixel_um=pixel, z_um=0.0, rng=rng)
    true = similarity(scale=float(rng.uniform(*scale)), rotation_deg=float(rng.uniform(*rotation_deg)),
                      translation_um=(*rng.uniform(-max_shift_um, max_shift_um, 2), 0.0))
    stage = rng.uniform(-60.0, 60.0, 2)
    micro_px = micro_field_um / n
    model = MicroscopeModel(shape_px=(n, n), pixel_size_um=micro_px, sample_from_microscope=true)
    micrograph = microscope_image(phantom, model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]), rng=rng)
    matrix = np.eye(3)
    matrix[:2, :2] = true[:2, :2]
    matrix[:2, 2] = true[:2, 3]
    return SectionCase(slice_image=slice_image, slice_pixel_um=pixel, micrograph=micrograph.astype(np.float64),
                       micrograph_pixel_um=micro_px, stage_um=stage, true_matrix=matrix, true_4x4=true)


# ---------------------------------------------------------------------------------------------- slice in volume


def dense_phantom(seed: int, *, diameter_um: float = 800.0, height_um: float = 400.0, n_inclusions: int = 900,
                  radius_um: tuple[float, float] = (8.0, 22.0)) -> Phantom:
    """A sample with a dense population of inclusions (a particle-reinforced alloy, ~10 % by volume).

    ``make_phantom``'s sample has ~8 small features per section away from the fiducial plane: too few for
    intensity-based slice-in-volume search at arbitrary heights. This one uses the same analytic feature
    model (pores, precipitates, Si phase; same materials and contrasts in both modalities).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 31337]))
    r_cyl, half_h = diameter_um / 2, height_um / 2
    features = [Feature("matrix", "matrix", (0.0, 0.0, 0.0), (r_cyl, r_cyl, half_h), 0.0, "cylinder")]
    centres: list[NDArray[np.float64]] = []
    radii: list[float] = []
    kinds = ("pore", "precipitate", "precipitate", "pore", "phase")
    for _ in range(50 * n_inclusions):
        if len(radii) >= n_inclusions:
            break
        r = float(rng.uniform(*radius_um))
        c = np.array([*rng.uniform(-r_cyl, r_cyl, 2), rng.uniform(-half_h, half_h)])
        if np.hypot(c[0], c[1]) + r + 2 > r_cyl or abs(c[2]) + r + 2 > half_h:
            continue
        if centres and np.any(np.linalg.norm(np.array(centres) - c, axis=1) < np.array(radii) + r + 2):
            continue
        centres.append(c)
        radii.append(r)
        kind = kinds[len(radii) % len(kinds)]
        axes = (r, r * float(rng.uniform(0.6, 1.0)), r * float(rng.uniform(0.6, 1.0)))
        features.append(Feature(kind, kind, tuple(c), axes, float(rng.uniform(0, 180)), "ellipsoid"))
    return Phantom(features=tuple(features), temperature_K=293.15)


def tilted_transform(*, rotation_deg: float, tilt_x_deg: float, tilt_y_deg: float,
                     translation_um: tuple[float, float, float]) -> NDArray[np.float64]:
    """``T = [Ry(tilt_y) Rx(tilt_x) Rz(rotation) | t]``: image frame (z = 0 plane) -> sample frame."""
    def rot(axis: int, deg: float) -> NDArray[np.float64]:
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = [(1, 2), (2, 0), (0, 1)][axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    out = np.eye(4)
    out[:3, :3] = rot(1, tilt_y_deg) @ rot(0, tilt_x_deg) @ rot(2, rotation_deg)
    out[:3, 3] = translation_um
    return out


@dataclass(frozen=True)
class SliceCase:
    volume: NDArray[np.float64]
    voxel_um: float
    image: NDArray[np.float64]
    pixel_um: float
    stage_um: NDArray[np.float64]
    true_4x4: NDArray[np.float64]

    def errors(self, estimate: NDArray[np.float64]) -> tuple[float, float, float]:
        """(out-of-plane error in voxels, 3-D position error in voxels, tilt error in deg) over the field corners."""
        rows, cols = self.image.shape
        hx, hy = (cols - 1) / 2 * self.pixel_um, (rows - 1) / 2 * self.pixel_um
        corners = np.array([[self.stage_um[0] + sx * hx, self.stage_um[1] + sy * hy, 0.0, 1.0]
                            for sx in (-1, 1) for sy in (-1, 1)])
        difference = (corners @ estimate.T - corners @ self.true_4x4.T)[:, :3]
        normal = np.cross(self.true_4x4[:3, 0], self.true_4x4[:3, 1])
        normal /= np.linalg.norm(normal)
        estimated_normal = np.cross(estimate[:3, 0], estimate[:3, 1])
        estimated_normal /= np.linalg.norm(estimated_normal)
        tilt = float(np.degrees(np.arccos(np.clip(abs(normal @ estimated_normal), -1.0, 1.0))))
        return (float(np.abs(difference @ normal).max() / self.voxel_um),
                float(np.linalg.norm(difference, axis=1).max() / self.voxel_um), tilt)


def slice_volume(phantom: Phantom, rng: np.random.Generator, *, shape_zyx=(64, 128, 128), voxel_um: float = 6.0,
                 noise: float = 0.05) -> NDArray[np.float64]:
    """The phantom voxelised on the reconstruction grid with reconstruction-like noise (1/mm)."""
    volume = phantom.voxelize(shape_zyx=shape_zyx, voxel_size_um=voxel_um).astype(np.float64)
    return volume + rng.normal(0.0, noise, volume.shape)


def slice_case(phantom: Phantom, volume: NDArray[np.float64], rng: np.random.Generator, *, modality: str,
               voxel_um: float = 6.0, shape_px: int = 128, pixel_um: float = 4.0, max_tilt_deg: float = 3.0,
               height_um: float = 120.0) -> SliceCase:
    """A random oblique plane through the volume, imaged by the SEM ("sem") or as X-ray attenuation ("xray")."""
    true = tilted_transform(rotation_deg=float(rng.uniform(-180, 180)),
                            tilt_x_deg=float(rng.uniform(-max_tilt_deg, max_tilt_deg)),
                            tilt_y_deg=float(rng.uniform(-max_tilt_deg, max_tilt_deg)),
                            translation_um=(*rng.uniform(-30.0, 30.0, 2), float(rng.uniform(-height_um, height_um))))
    stage = rng.uniform(-40.0, 40.0, 2)
    model = MicroscopeModel(shape_px=(shape_px, shape_px), pixel_size_um=pixel_um, sample_from_microscope=true)
    if modality == "sem":
        image = microscope_image(phantom, model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]), rng=rng)
    elif modality == "xray":
        points = microscope_pixel_points_um(model, stage_x_um=float(stage[0]), stage_y_um=float(stage[1]),
                                            supersample=2)
        mu = phantom.attenuation_at(apply(true, points.reshape(-1, 3))).astype(np.float64)
        image = mu.reshape(shape_px, 2, shape_px, 2).mean(axis=(1, 3)) + rng.normal(0.0, 0.05, (shape_px, shape_px))
    else:
        raise ValueError(f"modality must be 'sem' or 'xray', got {modality!r}")
    return SliceCase(volume=volume, voxel_um=voxel_um, image=np.asarray(image, dtype=np.float64), pixel_um=pixel_um,
                     stage_um=stage, true_4x4=true)
