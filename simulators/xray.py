"""Parallel-beam X-ray detector: Beer-Lambert projection of a phantom, optional Fresnel propagation,
optional detector blur (a Gaussian point-spread function), beam profile and pixel gain, Poisson photon
noise, dark offset and read noise.

Geometry (project contract): the beam travels along lab +y; detector column ``j`` is at
``u_j = (j - c) * pixel`` with ``c = (cols - 1)/2 + rotation_axis_offset_px + x_um / pixel`` the column of
the rotation axis; row ``i`` is at lab height ``(i - (rows - 1)/2) * pixel`` (row 0 lowest) and images the
sample height ``z_lab - z_um``. Material values are tabulated at 25 keV (see :mod:`.phantom`);
``energy_keV`` only sets the wavelength used for propagation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numpy.typing import NDArray

from corrflow.simulators.phantom import Phantom

__all__ = ["XrayDetectorModel", "detector_blur", "detector_counts", "fresnel_propagate", "xray_frame", "xray_transmission"]

_HC_KEV_UM = 1.23984198e-3  # h c in keV * um
_UINT16_MAX = 65535


@dataclass(frozen=True)
class XrayDetectorModel:
    """A scintillator + camera detector in a parallel monochromatic beam.

    Attributes
    ----------
    shape_px
        ``(rows, cols)``.
    pixel_size_um
        Effective pixel size at the sample (um).
    incident_photons_per_s
        Detected flat-field photons per pixel per second where the beam profile is 1.
    rotation_axis_offset_px
        True offset of the rotation axis from the detector centre with the stage x at 0 (px).
    dark_counts
        Dark offset (counts).
    read_noise_counts
        Gaussian read noise (counts, standard deviation).
    energy_keV
        Photon energy (keV); sets the wavelength for propagation.
    propagation_distance_mm
        Sample-detector distance for propagation phase contrast (mm); 0 gives pure absorption contrast.
    seed
        Seed of the fixed per-pixel gain pattern.
    phase_oversample
        Sub-samples per pixel edge on which the exit wave is propagated (only used when
        ``propagation_distance_mm > 0``); the intensity is then averaged over each pixel.
    blur_sigma_px
        Standard deviation of the detector's Gaussian point-spread function (scintillator and optics), in
        detector pixels; 0 (default) is a perfectly sharp detector. It blurs the noise-free intensity
        (:func:`detector_blur`), before photon and read noise, so the noise stays uncorrelated between
        pixels: a simplification, since in a real scintillator the same spread also correlates the X-ray
        quantum noise.
    """

    shape_px: tuple[int, int]
    pixel_size_um: float
    incident_photons_per_s: float
    rotation_axis_offset_px: float = 0.0
    dark_counts: float = 100.0
    read_noise_counts: float = 2.0
    energy_keV: float = 25.0
    propagation_distance_mm: float = 0.0
    seed: int = 0
    phase_oversample: int = 4
    blur_sigma_px: float = 0.0

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape_px)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape_px must be (rows, cols) of positive integers, got {self.shape_px!r}")
        object.__setattr__(self, "shape_px", shape)
        for name in ("pixel_size_um", "incident_photons_per_s", "energy_keV"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name in ("dark_counts", "read_noise_counts", "propagation_distance_mm", "blur_sigma_px"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {value}")
        if not math.isfinite(self.rotation_axis_offset_px):
            raise ValueError(f"rotation_axis_offset_px must be finite, got {self.rotation_axis_offset_px}")
        if int(self.phase_oversample) != self.phase_oversample or self.phase_oversample < 1:
            raise ValueError(f"phase_oversample must be a positive integer, got {self.phase_oversample}")

    @property
    def wavelength_um(self) -> float:
        """X-ray wavelength (um)."""
        return _HC_KEV_UM / self.energy_keV

    def axis_column(self, *, x_um: float = 0.0) -> float:
        """True column of the rotation axis (0-based, continuous) with the stage x at ``x_um``."""
        return (self.shape_px[1] - 1) / 2.0 + self.rotation_axis_offset_px + x_um / self.pixel_size_um

    def flat_profile(self) -> NDArray[np.float32]:
        """Relative incident intensity per pixel, shape ``(rows, cols)``, float32.

        A smooth Gaussian beam profile (peak 1, wider horizontally, as for an undulator beam) times a fixed
        per-pixel gain pattern (scintillator and camera non-uniformity, about 3 % rms) drawn from ``seed``.
        Returns a fresh copy of a cached array.
        """
        return _flat_profile(self.shape_px, int(self.seed)).copy()


@functools.lru_cache(maxsize=16)
def _flat_profile(shape_px: tuple[int, int], seed: int) -> NDArray[np.float32]:
    rows, cols = shape_px
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7031]))
    y = (np.arange(rows) - (rows - 1) / 2)[:, None]
    x = (np.arange(cols) - (cols - 1) / 2)[None, :]
    # Beam centre slightly off the detector centre, sigma 1.2x the width and 1.0x the height.
    x0, y0 = rng.uniform(-0.05, 0.05) * cols, rng.uniform(-0.05, 0.05) * rows
    beam = np.exp(-0.5 * (((x - x0) / (1.2 * cols)) ** 2 + ((y - y0) / (1.0 * rows)) ** 2))
    gain = np.clip(rng.normal(1.0, 0.03, size=(rows, cols)), 0.85, 1.15)
    profile = (beam * gain).astype(np.float32)
    profile.setflags(write=False)  # cached and shared: callers must not modify it
    return profile


def fresnel_propagate(
    wave: NDArray[np.complexfloating], *, sample_spacing_um: float, wavelength_um: float, distance_um: float
) -> NDArray[np.complex128]:
    """Propagate a 2-D complex wave by ``distance_um`` in free space (paraxial Fresnel transfer function).

    ``psi_z = IFFT[ FFT[psi_0] * exp(-i pi lambda z (fx^2 + fy^2)) ]`` (the common phase ``exp(i k z)`` is
    dropped). The wave is padded by edge replication to twice its size so the periodic FFT does not fold
    one edge onto the other.

    Parameters
    ----------
    wave
        Complex wave, shape ``(rows, cols)``, sampled every ``sample_spacing_um`` in both directions.
    sample_spacing_um, wavelength_um, distance_um
        Sampling step, wavelength and propagation distance (um).

    Returns
    -------
    ndarray, shape (rows, cols), complex128
    """
    wave = np.asarray(wave)
    if wave.ndim != 2:
        raise ValueError(f"wave must be 2-D (rows, cols), got shape {wave.shape}")
    if distance_um == 0:
        return wave.astype(np.complex128)
    rows, cols = wave.shape
    pr, pc = rows // 2 + 1, cols // 2 + 1
    padded = np.pad(wave.astype(np.complex128), ((pr, pr), (pc, pc)), mode="edge")
    fy = scipy.fft.fftfreq(padded.shape[0], d=sample_spacing_um)[:, None]
    fx = scipy.fft.fftfreq(padded.shape[1], d=sample_spacing_um)[None, :]
    kernel = np.exp(-1j * np.pi * wavelength_um * distance_um * (fx**2 + fy**2))
    out = scipy.fft.ifft2(scipy.fft.fft2(padded) * kernel)
    return out[pr : pr + rows, pc : pc + cols]


def detector_blur(image: NDArray[np.floating], *, sigma_px: float) -> NDArray[np.float64]:
    """Convolve an image with a Gaussian point-spread function of standard deviation ``sigma_px``.

    The transfer function is exactly ``exp(-2 pi^2 sigma_px^2 (fx^2 + fy^2))`` (``f`` in cycles per
    sample) on an FFT grid padded by edge replication (at least 6 sigma on each side), so the blur does
    not wrap one edge onto the other and the region beyond the image is taken to look like its edge.

    Parameters
    ----------
    image
        Shape ``(rows, cols)``, sampled on a square grid; axis 0 the row, axis 1 the column.
    sigma_px
        PSF standard deviation in samples of ``image`` (>= 0; 0 returns a float64 copy).

    Returns
    -------
    ndarray, shape (rows, cols), float64
    """
    data = np.asarray(image, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"image must be 2-D (rows, cols), got shape {data.shape}")
    if not (math.isfinite(sigma_px) and sigma_px >= 0):
        raise ValueError(f"sigma_px must be a non-negative finite number, got {sigma_px}")
    if sigma_px == 0:
        return data.copy()
    pad = int(math.ceil(6.0 * sigma_px)) + 1
    padded = np.pad(data, pad, mode="edge")
    fy = scipy.fft.fftfreq(padded.shape[0])[:, None]
    fx = scipy.fft.rfftfreq(padded.shape[1])[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * sigma_px**2 * (fx**2 + fy**2))
    blurred = scipy.fft.irfft2(scipy.fft.rfft2(padded) * transfer, s=padded.shape)
    return blurred[pad:-pad, pad:-pad]


def xray_transmission(
    phantom: Phantom, model: XrayDetectorModel, *, angle_deg: float, x_um: float, y_um: float, z_um: float
) -> NDArray[np.float32]:
    """Noise-free detected intensity relative to the incident beam, shape ``(rows, cols)``, float32.

    Without propagation this is ``exp(-line_integral)`` at the pixel centres. With
    ``propagation_distance_mm > 0`` the exit wave ``exp(-L/2 - i k D)`` (``L = integral mu dt``,
    ``D = integral delta dt``, ``k = 2 pi / lambda``) is sampled ``phase_oversample`` times finer, propagated
    with :func:`fresnel_propagate`, and ``|psi|^2`` is averaged over each pixel. With ``blur_sigma_px > 0``
    the intensity is blurred by the detector's point-spread function (:func:`detector_blur`) on the grid it
    is computed on (the pixel centres, or the finer propagation grid before the pixel average). ``y_um``
    (along the beam) does not change a parallel-beam projection.
    """
    del y_um  # parallel beam: a shift along the beam changes nothing
    rows, cols = model.shape_px
    px = model.pixel_size_um
    c = model.axis_column(x_um=x_um)
    if model.propagation_distance_mm == 0:
        u = (np.arange(cols) - c) * px
        z = (np.arange(rows) - (rows - 1) / 2) * px - z_um
        intensity = np.exp(-phantom.line_integrals(angle_deg=angle_deg, u_um=u, z_um=z))
        if model.blur_sigma_px > 0:
            intensity = detector_blur(intensity, sigma_px=model.blur_sigma_px)
        return intensity.astype(np.float32)
    s = int(model.phase_oversample)
    sub = (np.arange(s) + 0.5) / s - 0.5
    u = ((np.arange(cols)[:, None] + sub[None, :] - c) * px).ravel()
    z = ((np.arange(rows)[:, None] + sub[None, :] - (rows - 1) / 2) * px).ravel() - z_um
    mu_int = phantom.line_integrals(angle_deg=angle_deg, u_um=u, z_um=z).astype(np.float64)
    delta_int_um = phantom.delta_integrals(angle_deg=angle_deg, u_um=u, z_um=z)
    k_per_um = 2.0 * np.pi / model.wavelength_um
    wave = np.exp(-0.5 * mu_int - 1j * k_per_um * delta_int_um)
    wave = fresnel_propagate(
        wave,
        sample_spacing_um=px / s,
        wavelength_um=model.wavelength_um,
        distance_um=model.propagation_distance_mm * 1e3,
    )
    intensity = np.abs(wave) ** 2
    if model.blur_sigma_px > 0:
        intensity = detector_blur(intensity, sigma_px=model.blur_sigma_px * s)
    return intensity.reshape(rows, s, cols, s).mean(axis=(1, 3)).astype(np.float32)


def xray_frame(
    phantom: Phantom,
    model: XrayDetectorModel,
    *,
    angle_deg: float,
    x_um: float,
    y_um: float,
    z_um: float,
    exposure_s: float,
    shutter_open: bool,
    rng: np.random.Generator,
) -> NDArray[np.uint16]:
    """One detector frame, shape ``(rows, cols)``, uint16 counts.

    ``dark + Poisson(I0 * exposure_s * flat_profile * transmission) + Normal(0, read_noise)``, rounded and
    clipped to the uint16 range; with the shutter closed the photon term is zero (a dark frame). A sample
    moved out of the field of view gives a flat field because its line integrals are zero.

    Parameters
    ----------
    phantom
        The sample.
    model
        The detector.
    angle_deg
        Rotation stage angle (deg).
    x_um, y_um, z_um
        Sample stage translations (um): x across the beam, y along it, z up.
    exposure_s
        Exposure time (s).
    shutter_open
        Whether photons reach the sample.
    rng
        Noise generator.
    """
    if not (math.isfinite(exposure_s) and exposure_s >= 0):
        raise ValueError(f"exposure_s must be a non-negative finite number, got {exposure_s}")
    for name, value in (("angle_deg", angle_deg), ("x_um", x_um), ("y_um", y_um), ("z_um", z_um)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    transmission = None
    if shutter_open and exposure_s > 0:
        transmission = xray_transmission(phantom, model, angle_deg=angle_deg, x_um=x_um, y_um=y_um, z_um=z_um)
    return detector_counts(model, transmission, exposure_s=exposure_s, rng=rng)


def detector_counts(
    model: XrayDetectorModel,
    transmission: NDArray[np.floating] | None,
    *,
    exposure_s: float,
    rng: np.random.Generator,
) -> NDArray[np.uint16]:
    """The frame :func:`xray_frame` records for a noise-free detected intensity, shape ``(rows, cols)``, uint16.

    ``dark + Poisson(I0 * exposure_s * flat_profile * transmission) + Normal(0, read_noise)``, rounded and
    clipped to the uint16 range.

    Parameters
    ----------
    model
        The detector.
    transmission
        Noise-free detected intensity relative to the incident beam (:func:`xray_transmission`), shape
        ``(rows, cols)``; None = no photons (shutter closed: a dark frame).
    exposure_s
        Exposure time (s), >= 0.
    rng
        Noise generator.
    """
    if not (math.isfinite(exposure_s) and exposure_s >= 0):
        raise ValueError(f"exposure_s must be a non-negative finite number, got {exposure_s}")
    if transmission is not None and exposure_s > 0:
        transmission = np.asarray(transmission)
        if transmission.shape != model.shape_px:
            raise ValueError(f"transmission must have shape {model.shape_px}, got {transmission.shape}")
        expected = model.incident_photons_per_s * exposure_s * model.flat_profile().astype(np.float64) * transmission
        photons = rng.poisson(expected).astype(np.float64)
    else:
        photons = np.zeros(model.shape_px, dtype=np.float64)
    counts = model.dark_counts + photons + rng.normal(0.0, model.read_noise_counts, size=model.shape_px)
    return np.clip(np.rint(counts), 0, _UINT16_MAX).astype(np.uint16)
