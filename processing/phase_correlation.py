"""Sub-pixel translation between two images of the same modality by windowed phase correlation.

Conventions
-----------
* Images are ``(rows, cols)`` arrays; points are ``(x, y) = (column, row)`` in pixels.
* ``shift_xy_px = s`` means the content of ``moving`` is the content of ``reference`` displaced by ``s``:
  ``moving(p) = reference(p - s)``. The 3x3 ``matrix`` maps MOVING points to REFERENCE points
  (``p_ref = p_mov - s``), the convention of :mod:`corrflow.processing.registration`.
  (scikit-image's ``phase_cross_correlation`` returns ``-s``.)

Why not the textbook recipe
---------------------------
Classic phase correlation whitens the cross-power spectrum (``R / |R|``). On crops that are not periodic
and are band-limited (every real image: optics blur the high frequencies, the crop cuts objects at the
border) whitening gives the noise-only high frequencies and the border discontinuity the same weight as the
signal, and the peak can jump by many pixels. Here:

1. each image has its (window-weighted) mean removed and is multiplied by a separable Hann (or Tukey)
   window, so the crop border contributes nothing;
2. the cross-power spectrum is NOT normalised (plain cross-correlation: each frequency weighted by its
   signal power, the matched filter for white noise);
3. the integer peak is refined to sub-pixel precision by Newton's method on the band-limited (Fourier)
   interpolation of the correlation, evaluated exactly from the spectrum (equivalent to an infinitely
   upsampled DFT, at the cost of a few matrix-vector products);
4. the window biases the peak towards zero shift (the product of two windows that are not on the same
   content falls off with the shift). The estimate is therefore repeated with windows placed on the
   common overlap, the moving window displaced by the current estimate, until the estimate stops moving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike, NDArray

from corrflow.processing.registration import RegistrationError

__all__ = ["TranslationResult", "phase_correlation_shift"]

Window = Literal["hann", "tukey", "none"]
_WINDOWS = ("hann", "tukey", "none")
# A window shorter than this many pixels along an axis leaves too little signal to correlate.
_MIN_WINDOW_PX = 8


@dataclass(frozen=True, eq=False)
class TranslationResult:
    """A translation between two images.

    Attributes
    ----------
    shift_xy_px : ndarray, shape (2,), float64
        ``(dx, dy)``: ``moving(p) = reference(p - shift)``, pixels.
    matrix : ndarray, shape (3, 3), float64
        Homogeneous transform mapping moving points ``(x, y)`` to reference points.
    correlation : float
        Normalised cross-correlation coefficient of the two windowed, mean-free images at the shift, in
        [-1, 1]: ~1 for the same content at high SNR, ``SNR² / (1 + SNR²)`` for white noise of a given
        SNR, ~0 for unrelated images. The confidence measure.
    overlap_fraction : float
        Fraction of the image area common to both images at the shift.
    iterations : int
        Window re-placements performed (1 = the full-frame estimate only).
    ok : bool
        ``correlation >= min_correlation`` (only False when ``raise_on_failure=False``).
    message : str
    """

    shift_xy_px: NDArray[np.float64]
    matrix: NDArray[np.float64] = field(repr=False)
    correlation: float
    overlap_fraction: float
    iterations: int
    ok: bool
    message: str = ""

    @property
    def shift_rc_px(self) -> NDArray[np.float64]:
        """The shift as ``(d_row, d_col)``, shape (2,)."""
        return self.shift_xy_px[::-1].copy()


def _as_image(image: ArrayLike, name: str) -> NDArray[np.float64]:
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, cols), got shape {img.shape}")
    if img.size == 0 or not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise ValueError(f"{name} must be a non-empty real numeric array, got dtype {img.dtype}, shape {img.shape}")
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return img


def _window_1d(n: int, start: float, length: float, kind: str, alpha: float) -> NDArray[np.float64]:
    """Window of continuous support ``[start, start + length]`` sampled at pixel centres ``0..n-1``.

    Defined analytically, so a sub-pixel displacement of ``start`` moves the window exactly with the
    image content (step 4 of the module notes).
    """
    if kind == "none":
        out = np.zeros(n)
        lo, hi = int(np.ceil(start)), int(np.floor(start + length))
        out[max(lo, 0) : min(hi, n - 1) + 1] = 1.0
        return out
    t = (np.arange(n) - start) / length  # 0..1 across the support
    inside = (t >= 0) & (t <= 1)
    if kind == "hann":
        out = 0.5 - 0.5 * np.cos(2.0 * np.pi * t)
    else:  # Tukey: flat top, cosine tapers of width alpha/2 at each end
        out = np.ones(n)
        taper = alpha / 2.0
        rising = t < taper
        falling = t > 1.0 - taper
        out[rising] = 0.5 - 0.5 * np.cos(np.pi * t[rising] / taper)
        out[falling] = 0.5 - 0.5 * np.cos(np.pi * (1.0 - t[falling]) / taper)
    return np.where(inside, out, 0.0)


def _prepare(image: NDArray[np.float64], wy: NDArray[np.float64], wx: NDArray[np.float64]) -> NDArray[np.float64]:
    """Remove the window-weighted mean, then apply the window (step 1)."""
    w = wy[:, None] * wx[None, :]
    mean = float((w * image).sum() / w.sum())
    return (image - mean) * w


def _signed(n: int) -> NDArray[np.float64]:
    k = np.fft.fftfreq(n) * n
    if n % 2 == 0:
        k[n // 2] = 0.0  # the Nyquist term is zeroed in the spectrum; its frequency is irrelevant
    return k


def _refine_peak(
    cross: NDArray[np.complex128], ky: NDArray[np.float64], kx: NDArray[np.float64], weight_x: NDArray[np.float64],
    shape: tuple[int, int], start_yx: NDArray[np.float64], tolerance_px: float,
) -> tuple[NDArray[np.float64], float]:
    """Newton ascent on ``c(t) = Re sum_k w C(k) exp(2 pi i k.t / N)`` (the band-limited correlation).

    ``cross`` is the half spectrum from ``rfft2`` (last axis non-negative frequencies, ``weight_x`` = 1 for
    the zero frequency and 2 for the others), so ``c`` is real. Returns ``(t_yx, c(t))``.
    """
    ny, nx = shape
    wy, wx = 2.0 * np.pi * ky / ny, 2.0 * np.pi * kx / nx  # radians per pixel of shift
    weighted = cross * weight_x[None, :]
    t = start_yx.astype(np.float64).copy()
    value = -np.inf
    for _ in range(30):
        ey = np.exp(1j * wy * t[0])
        ex = np.exp(1j * wx * t[1])
        # sum_k C ey ex f(kx) g(ky) = (ey g)^T C (ex f): three matrix-vector products, no (ny, nx) temporaries.
        cols = weighted @ np.stack([ex, ex * wx, ex * wx * wx], axis=1)  # (ny, 3)
        s = (ey @ cols).real
        sy = ((ey * wy) @ cols).real
        syy = (ey * wy * wy) @ cols[:, 0]
        value = float(s[0])
        grad = -np.array([((ey * wy) @ cols[:, 0]).imag, (ey @ cols[:, 1]).imag])  # d/dt of Re(e^{i w t}) = -w Im
        hess = -np.array([[syy.real, sy[1]], [sy[1], s[2]]])
        # Newton step if the Hessian is negative definite (we are on the peak's cap), else a gradient step.
        if np.all(np.linalg.eigvalsh(hess) < 0):
            step = -np.linalg.solve(hess, grad)
        else:
            step = grad / (np.abs(grad).max() + 1e-300) * 0.25
        norm = float(np.hypot(*step))
        if norm > 0.5:  # never jump out of the lobe the integer peak picked
            step *= 0.5 / norm
        t += step
        if norm < tolerance_px:
            break
    ey = np.exp(1j * wy * t[0])
    ex = np.exp(1j * wx * t[1])
    value = float((ey @ (weighted @ ex)).real)
    return t, value


def phase_correlation_shift(
    reference: ArrayLike,
    moving: ArrayLike,
    *,
    window: Window = "hann",
    tukey_alpha: float = 0.5,
    max_iterations: int = 4,
    tolerance_px: float = 1e-3,
    min_overlap: float = 0.25,
    min_correlation: float = 0.2,
    raise_on_failure: bool = True,
    workers: int | None = None,
) -> TranslationResult:
    """Sub-pixel translation between two same-modality images (windowed, unnormalised phase correlation).

    See the module notes for the method. Precision at SNR 10 on non-periodic 512² crops of a band-limited
    texture: 0.003 px median, 0.009 px worst over 50 random shifts (``python -m benchmarks.registration``;
    scikit-image's default ``phase_cross_correlation``: 0.09 px median, 0.94 px worst).

    Parameters
    ----------
    reference, moving : array_like, shape (rows, cols)
        The two images, same shape, any real dtype. Non-periodic crops are fine.
    window : {"hann", "tukey", "none"}
        Apodisation window. ``"none"`` is only sensible for periodic images.
    tukey_alpha : float
        Fraction of the Tukey window that tapers, in (0, 1].
    max_iterations : int
        Window placements (>= 1): the first is on the full frame, the others on the estimated overlap.
    tolerance_px : float
        Stop when the estimate moves less than this between placements (and the Newton step size).
    min_overlap : float
        Smallest accepted overlap fraction (of the image area) at the estimated shift.
    min_correlation : float
        Smallest accepted correlation coefficient (see :class:`TranslationResult`).
    raise_on_failure : bool
        If False, a low-correlation result is returned with ``ok=False`` instead of raising. Too little
        overlap always raises.
    workers : int, optional
        Threads for scipy.fft (default: scipy's default, 1).

    Returns
    -------
    TranslationResult

    Raises
    ------
    RegistrationError
        Overlap below ``min_overlap`` (the images do not show the same region), a window shorter than 8 px,
        a constant image, or (with ``raise_on_failure``) correlation below ``min_correlation``.
    ValueError
        Bad arrays (not 2-D, different shapes, NaN) or options.
    """
    ref = _as_image(reference, "reference")
    mov = _as_image(moving, "moving")
    if ref.shape != mov.shape:
        raise ValueError(f"reference and moving must have the same shape, got {ref.shape} and {mov.shape}")
    if min(ref.shape) < _MIN_WINDOW_PX:
        raise ValueError(f"images must be at least {_MIN_WINDOW_PX} px along each axis, got {ref.shape}")
    if window not in _WINDOWS:
        raise ValueError(f"window must be one of {_WINDOWS}, got {window!r}")
    if not 0 < tukey_alpha <= 1:
        raise ValueError(f"tukey_alpha must lie in (0, 1], got {tukey_alpha!r}")
    if int(max_iterations) != max_iterations or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    if not (np.isfinite(tolerance_px) and tolerance_px > 0):
        raise ValueError(f"tolerance_px must be a positive finite number, got {tolerance_px!r}")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must lie in (0, 1], got {min_overlap!r}")
    if not -1 <= min_correlation <= 1:
        raise ValueError(f"min_correlation must lie in [-1, 1], got {min_correlation!r}")
    if np.ptp(ref) == 0 or np.ptp(mov) == 0:
        raise RegistrationError("an image is constant: there is nothing to correlate")

    ny, nx = ref.shape
    ky, kx = _signed(ny), np.arange(nx // 2 + 1, dtype=np.float64)
    weight_x = np.full(kx.size, 2.0)
    weight_x[0] = 1.0
    if nx % 2 == 0:
        weight_x[-1] = 0.0  # Nyquist column: its phase is ambiguous for a real image
    row_nyquist = ny // 2 if ny % 2 == 0 else None

    def spectrum(image: NDArray[np.float64]) -> NDArray[np.complex128]:
        out = scipy.fft.rfft2(image, workers=workers)
        if row_nyquist is not None:
            out[row_nyquist] = 0.0
        return out

    shift = np.zeros(2)  # (dy, dx)
    correlation = 0.0
    iterations = 0
    full = (0.0, 0.0, float(ny - 1), float(nx - 1))
    for iterations in range(1, int(max_iterations) + 1):
        if iterations == 1:
            ref_box = mov_box = full  # (y0, x0, length_y, length_x) of the window supports
        else:
            # Windows on the common overlap: reference support starts at max(0, -s), moving's at max(0, s).
            length_y, length_x = ny - 1 - abs(shift[0]), nx - 1 - abs(shift[1])
            if min(length_y, length_x) < _MIN_WINDOW_PX:
                raise RegistrationError(
                    f"no overlap: the shift (dx, dy) = ({shift[1]:.1f}, {shift[0]:.1f}) px leaves a common "
                    f"region shorter than {_MIN_WINDOW_PX} px"
                )
            ref_box = (max(0.0, -shift[0]), max(0.0, -shift[1]), length_y, length_x)
            mov_box = (max(0.0, shift[0]), max(0.0, shift[1]), length_y, length_x)
        a = _prepare(ref, _window_1d(ny, ref_box[0], ref_box[2], window, tukey_alpha),
                     _window_1d(nx, ref_box[1], ref_box[3], window, tukey_alpha))
        b = _prepare(mov, _window_1d(ny, mov_box[0], mov_box[2], window, tukey_alpha),
                     _window_1d(nx, mov_box[1], mov_box[3], window, tukey_alpha))
        norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
        if norm == 0:
            raise RegistrationError("an image is constant under the window: there is nothing to correlate")
        cross = np.conj(spectrum(a)) * spectrum(b)
        if iterations == 1:
            surface = scipy.fft.irfft2(cross, s=(ny, nx), workers=workers)
            peak = np.array(np.unravel_index(int(np.argmax(surface)), surface.shape), dtype=np.float64)
            start = np.where(peak > np.array([ny, nx]) / 2, peak - np.array([ny, nx]), peak)
        else:
            # The windows now sit on the same content, so the product of the windows no longer pulls the
            # peak towards zero shift; the peak is within a fraction of a pixel of the previous estimate.
            start = shift
        estimate, value = _refine_peak(cross, ky, kx, weight_x, (ny, nx), start, tolerance_px * 0.1)
        # sum_p a(p) b(p + t) = (1/N) sum_k conj(A) B e^{2 pi i k.t/N}: divide by N for the coefficient.
        correlation = value / (ny * nx) / norm
        previous = shift.copy()
        shift = estimate
        if iterations > 1 and float(np.hypot(*(shift - previous))) < tolerance_px:
            break

    overlap = (ny - abs(shift[0])) * (nx - abs(shift[1])) / (ny * nx)
    shift_xy = np.array([shift[1], shift[0]])
    matrix = np.eye(3)
    matrix[:2, 2] = -shift_xy
    message = (
        f"shift (dx, dy) = ({shift_xy[0]:.3f}, {shift_xy[1]:.3f}) px, correlation {correlation:.3f} "
        f"(limit {min_correlation}), overlap {overlap:.2f}, {iterations} window placement(s)"
    )
    if overlap < min_overlap:
        raise RegistrationError(f"no overlap: {message} (overlap limit {min_overlap})")
    ok = correlation >= min_correlation
    if not ok and raise_on_failure:
        raise RegistrationError(f"translation rejected, the images do not correlate: {message}")
    return TranslationResult(
        shift_xy_px=shift_xy, matrix=matrix, correlation=float(correlation), overlap_fraction=float(overlap),
        iterations=iterations, ok=bool(ok), message=message,
    )

