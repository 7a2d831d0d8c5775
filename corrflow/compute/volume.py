"""Reconstruct an NXtomo file into a volume file, chunk by chunk, with provenance.

Reads the raw NXtomo in slabs of detector rows, so memory stays bounded by a few copies of one
slab of ``n_projections * chunk_rows * n_cols`` float32, plus the flat and dark means
(``2 * rows * cols`` float32), one output slab (``chunk_rows * width**2`` float32) and a 1 MiB hash
buffer, whatever the size of the scan (tests/test_volume.py measures it). The volume is written as NeXus ``NXdata`` (``/entry/data/data``,
axes ``z, y, x``, mu in 1/mm) under a temporary name and renamed only when complete, so a
half-written volume never looks finished.

Per slab, in this order (each optional step off unless asked for):

1. flat/dark correction (:func:`~corrflow.processing.normalize.normalize`) and ``-ln``;
2. ring removal on the sinograms (:func:`~corrflow.processing.rings.remove_stripes_sorting`);
3. Paganin phase retrieval (:class:`PhaseRetrieval`, :func:`~corrflow.processing.phase.paganin`) of the
   transmission instead of the plain ``-ln``. The filter is 2-D, so each projection is filtered with
   ``pad_px`` of surroundings on every side: real detector rows above and below the slab (the slab
   reads ``chunk_rows + 2 pad_px`` rows and keeps only its own), edge-replicated rows beyond the
   detector's top and bottom, and edge-replicated columns. Every row is then filtered with the same
   surroundings whatever slab it is in, so the chunk size does not change the volume (to float32
   round-off) as long as ``pad_px`` spans the filter's reach (the default, :data:`PAGANIN_PAD_LENGTHS`
   Paganin lengths). The margin is read and filtered for every slab, so chunks of at least
   ``2 pad_px`` rows waste little. With ring removal too, step 2 runs on every row read, margin
   included, before the filter (which would widen a one-column stripe beyond what the stripe filter
   removes); that needs all projections of those rows at once, so the memory bound becomes a few
   copies of ``n_projections * (chunk_rows + 2 pad_px) * n_cols`` float32;
4. the offset-centre conversion below, then FBP.

Before the slabs, the resolution of the scan is estimated from its middle :data:`RESOLUTION_ROWS`
detector rows, processed exactly as the slabs are (one more slab's memory): the Fourier ring
correlation of the reconstructions from the even and the odd projections
(:func:`~corrflow.processing.resolution.half_dataset_resolution`), averaged ring by ring over the
rows. It is stored in the volume's provenance (``resolution``) and returned with the volume. Like
any half-dataset FRC it measures where the signal-to-noise ratio per spatial frequency runs out, so it
depends on the blur of the data AND its noise (and rings common to both halves raise it).

Scans over a full turn are recognised from their angles. A centred 360° scan is back-projected over
all its angles (FBP weights fold them modulo 180°). An offset-centre (half-acquisition) 360° scan, the
rotation axis shifted towards one detector edge so that the two half turns together see a sample up
to about twice the detector width, is recognised from the file (``/entry/sample/rotation_axis_offset``
or ``field_of_view = "Half"`` written by :func:`corrflow.formats.nexus.write_nxtomo`, or the ``axis_offset_um``
setting of the scan) or told by ``half_acquisition=True``: its axis is found from the data
(:func:`~corrflow.processing.sinogram360.find_axis_360`), each slab is converted to a 180° sinogram
(:func:`~corrflow.processing.sinogram360.sinogram_360_to_180`) and reconstructed on the wider grid
(``width = floor(2 c') + 1`` columns, ``c'`` the axis distance from the far detector edge).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

import corrflow
from corrflow.processing.centering import find_rotation_center
from corrflow.processing.fbp import fbp_volume
from corrflow.processing.normalize import line_integrals, normalize, reference_field
from corrflow.processing.phase import paganin, paganin_length_um
from corrflow.processing.resolution import (
    FourierCorrelation,
    half_dataset_resolution,
    resolution_from_curve,
)
from corrflow.processing.rings import remove_stripes_sorting
from corrflow.processing.sinogram360 import (
    covers_full_turn,
    find_axis_360,
    half_acquisition_geometry,
    sinogram_360_to_180,
)
from corrflow.formats.checksums import sha256_file
from corrflow.formats.nexus import IMAGE_KEY_DARK, IMAGE_KEY_FLAT, IMAGE_KEY_PROJECTION, linked_files
HASH_CHUNK_BYTES = 1 << 20  # hashing the input is I/O bound: a small buffer costs no speed
# The Paganin kernel decays as exp(-r / L) (L the Paganin length); its weight beyond 16 L, exp(-16) / 2,
# is at float32 resolution, so surroundings of 16 L make a row's filtered value independent of what
# lies further away, i.e. of the slab it was read in (3 L, the usual FFT padding, leaves 2.5 %).
PAGANIN_PAD_LENGTHS = 16.0
_PAGANIN_BLOCK_PROJECTIONS = 16  # projections filtered per read: bounds the padded temporaries
RESOLUTION_ROWS = 8  # middle detector rows whose ring correlations are averaged
_LENGTH_TO_UM = {"um": 1.0, "micrometer": 1.0, "micron": 1.0, "mm": 1e3, "millimeter": 1e3, "m": 1e6, "meter": 1e6}


class VolumeInputError(ValueError):
    """The raw file cannot be reconstructed; the message names the dataset and the problem."""


@dataclass(frozen=True)
class VolumeProduct:
    """A finished volume: ``center_px`` is the rotation-axis column on the DETECTOR (px).

    ``resolution_um`` is the half-dataset resolution (µm) of the middle rows, None when it was not
    estimated; the provenance's ``resolution`` block says how it was found.
    """

    path: Path
    center_px: float
    voxel_size_um: float
    shape_zyx: tuple[int, int, int]
    input_sha256: str
    seconds: float
    acquisition: str = "180"  # "180", "360" (centred) or "360-half" (offset centre, widened field)
    resolution_um: float | None = None
    # The files the input links its frames from (a virtual dataset), absolute path -> sha256 as read.
    linked_sha256: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseRetrieval:
    """Paganin single-distance phase retrieval of every projection (before the logarithm).

    Attributes
    ----------
    delta_beta
        ``delta / beta`` of the sample's main material (dimensionless, > 0).
    energy_keV
        Photon energy (keV); None = the scan's ``/entry/instrument/monochromator/energy``.
    distance_mm
        Sample-detector propagation distance (mm); None = the scan's ``/entry/instrument/detector/distance``.
    pad_px
        Surroundings each projection is filtered with on every side (px): real detector rows above and
        below the slab, edge-replicated rows beyond the detector and edge-replicated columns. None =
        :data:`PAGANIN_PAD_LENGTHS` Paganin lengths (rounded up to whole pixels).

    A :class:`SlabJob` always carries a resolved one (every field a number), made by
    :func:`reconstruct_nxtomo` from the scan.
    """

    delta_beta: float
    energy_keV: float | None = None
    distance_mm: float | None = None
    pad_px: int | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.delta_beta) and self.delta_beta > 0):
            raise ValueError(f"delta_beta must be a positive finite number, got {self.delta_beta!r}")
        for name in ("energy_keV", "distance_mm"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
        if self.pad_px is not None and (int(self.pad_px) != self.pad_px or self.pad_px < 0):
            raise ValueError(f"pad_px must be a non-negative integer or None, got {self.pad_px!r}")

    def length_um(self) -> float:
        """The Paganin length (µm) of a resolved retrieval (:func:`~corrflow.processing.phase.paganin_length_um`)."""
        if self.energy_keV is None or self.distance_mm is None:
            raise ValueError("energy_keV and distance_mm must be resolved first")
        return paganin_length_um(energy_keV=self.energy_keV, distance_mm=self.distance_mm, delta_beta=self.delta_beta)


@dataclass(frozen=True)
class SlabJob:
    """Everything one worker needs to reconstruct detector rows ``[r0, r1)``; it reads them itself.

    Only the flat/dark rows the slab reads (:attr:`read_rows`: its own, plus the Paganin margin) travel
    with the job (small), never the projections.
    """

    nxtomo_path: str
    r0: int
    r1: int
    projection_index: slice | np.ndarray
    flat_rows: np.ndarray  # (read_rows[1] - read_rows[0], cols) float32
    dark_rows: np.ndarray
    angles_deg: np.ndarray
    center_px: float
    filter_name: str
    pixel_size_um: float
    threads: int | None = None  # FBP threads; 1 per Dask worker thread avoids oversubscribing cores
    # Offset-centre 360° scan: convert each sinogram to 180° (axis center_px on the detector) first.
    half_acquisition: bool = False
    output_size: int | None = None  # reconstruction grid (px); None = n_cols
    # Resolved Paganin retrieval (every field set); then flat_rows/dark_rows cover read_rows.
    phase_retrieval: PhaseRetrieval | None = None
    detector_rows: int | None = None  # rows of the whole detector: where the Paganin margin stops
    ring_removal_size_px: int | None = None  # median width across columns (px, odd); None = off

    @property
    def read_rows(self) -> tuple[int, int]:
        """Detector rows ``[lo, hi)`` the job reads: its own, plus the Paganin margin within the detector."""
        if self.phase_retrieval is None:
            return self.r0, self.r1
        pad = int(self.phase_retrieval.pad_px or 0)
        rows = self.r1 if self.detector_rows is None else self.detector_rows
        return max(0, self.r0 - pad), min(rows, self.r1 + pad)


SlabMapper = Callable[[Iterable[SlabJob]], Iterator[tuple[SlabJob, np.ndarray]]]


def _line_integral_slab(raw: h5py.File, job: SlabJob) -> np.ndarray:
    raw_slab = raw["/entry/instrument/detector/data"][job.projection_index, job.r0 : job.r1, :]
    own = slice(job.r0 - job.read_rows[0], job.r1 - job.read_rows[0])  # the references may hold a margin
    mu_t = line_integrals(raw_slab, job.flat_rows[own][None], job.dark_rows[own][None])
    return np.ascontiguousarray(mu_t.transpose(1, 0, 2))  # (rows, angles, cols)


def _paganin_slab(raw: h5py.File, job: SlabJob) -> np.ndarray:
    """Line integrals of the slab's rows after Paganin retrieval, ``(rows, angles, cols)`` float32.

    Reads the slab with its margin a block of projections at a time, so the temporaries stay a few
    blocks of ``(rows + 2 pad) x (cols + 2 pad)`` whatever the number of projections. With ring removal
    the stripes are removed first, from the line integrals of every row of the window: the filter would
    spread a one-column stripe over a few Paganin lengths, wider than the stripe filter's median can
    take. That needs every projection of those rows at once, so memory is then a few copies of the
    window, ``n_projections x (rows + 2 pad) x cols`` float32.
    """
    phase = job.phase_retrieval
    if phase is None or phase.energy_keV is None or phase.distance_mm is None or phase.pad_px is None:
        raise ValueError(f"the slab's phase retrieval must be resolved (energy, distance, padding), got {phase}")
    pad = int(phase.pad_px)
    lo, hi = job.read_rows
    # Rows the detector does not have are edge-replicated, so every row sees pad rows on each side.
    row_pad = (pad - (job.r0 - lo), pad - (hi - job.r1))
    data = raw["/entry/instrument/detector/data"]
    if isinstance(job.projection_index, slice):
        start = job.projection_index.start or 0
        n_proj = job.projection_index.stop - start
        frames = lambda k0, k1: slice(start + k0, start + k1)  # noqa: E731 - h5py reads slices fastest
    else:
        n_proj = len(job.projection_index)
        frames = lambda k0, k1: job.projection_index[k0:k1]  # noqa: E731
    rows, cols = job.r1 - job.r0, data.shape[2]

    def read(k0: int, k1: int) -> np.ndarray:  # transmission, (k1 - k0, hi - lo, cols)
        return normalize(data[frames(k0, k1), lo:hi, :], job.flat_rows[None], job.dark_rows[None])

    block = read
    if job.ring_removal_size_px is not None:
        window = read(0, n_proj)
        np.log(window, out=window)  # normalize() clipped it above 0
        np.negative(window, out=window)
        cleaned = remove_stripes_sorting(window.transpose(1, 0, 2), size=job.ring_removal_size_px)
        del window
        np.negative(cleaned, out=cleaned)
        np.exp(cleaned, out=cleaned)
        corrected = cleaned.transpose(1, 0, 2)  # (angles, rows, cols) view
        block = lambda k0, k1: corrected[k0:k1]  # noqa: E731
    out = np.empty((rows, n_proj, cols), dtype=np.float32)
    for k0 in range(0, n_proj, _PAGANIN_BLOCK_PROJECTIONS):
        k1 = min(n_proj, k0 + _PAGANIN_BLOCK_PROJECTIONS)
        transmission = block(k0, k1)
        if pad:
            transmission = np.pad(transmission, ((0, 0), row_pad, (pad, pad)), mode="edge")
        # pad_px=0: the surroundings are already in place (real rows where the detector has them).
        mu_t = paganin(transmission, energy_keV=phase.energy_keV, distance_mm=phase.distance_mm,
                       pixel_size_um=job.pixel_size_um, delta_beta=phase.delta_beta, pad_px=0, workers=job.threads)
        out[:, k0:k1, :] = mu_t[:, pad : pad + rows, pad : pad + cols].transpose(1, 0, 2)
    return out


def slab_sinograms(raw: h5py.File, job: SlabJob) -> np.ndarray:
    """The slab's sinograms as they are back-projected, ``(r1 - r0, n_projections, n_cols)`` float32.

    Dimensionless line integrals (``mu T``) of the detector (before any offset-centre conversion):
    flat/dark corrected, rings removed if the job asks for it, Paganin-retrieved if it asks for it
    (the rings then removed before the filter, see :func:`_paganin_slab`). ``raw`` is the job's
    NXtomo file, open for reading.
    """
    if job.phase_retrieval is not None:
        return _paganin_slab(raw, job)
    sinograms = _line_integral_slab(raw, job)
    if job.ring_removal_size_px is not None:
        sinograms = remove_stripes_sorting(sinograms, size=job.ring_removal_size_px)
    return sinograms


def _as_180(job: SlabJob, sinograms: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The sinograms, angles and centre to back-project (an offset-centre scan converted to 180°)."""
    if not job.half_acquisition:
        return sinograms, job.angles_deg, job.center_px
    half = sinogram_360_to_180(sinograms, job.angles_deg, center_px=job.center_px)
    return half.sinograms, half.angles_deg, half.center_px


def reconstruct_slab(job: SlabJob) -> np.ndarray:
    """Read, normalize (remove rings, retrieve the phase, as the job asks) and back-project one slab;
    returns ``(r1 - r0, n, n)`` float32, mu in 1/mm, ``n = job.output_size`` (default the detector width)."""
    try:
        with h5py.File(job.nxtomo_path, "r") as raw:
            sinograms = slab_sinograms(raw, job)
        sinograms, angles_deg, center_px = _as_180(job, sinograms)
        return fbp_volume(
            sinograms, angles_deg, center_px=center_px, filter_name=job.filter_name, output_size=job.output_size,
            pixel_size_um=job.pixel_size_um, workers=job.threads,
        )
    except VolumeInputError:
        raise
    except ValueError as exc:  # the kernels' checks (NaN, shapes): say which file and rows, wherever it ran
        raise VolumeInputError(
            f"{job.nxtomo_path}: /entry/instrument/detector/data rows {job.r0}..{job.r1 - 1}: {exc}"
        ) from exc


def sequential_slabs(jobs: Iterable[SlabJob]) -> Iterator[tuple[SlabJob, np.ndarray]]:
    """The default mapper: one slab after another in this process."""
    for job in jobs:
        yield job, reconstruct_slab(job)


def _length_um(dataset: h5py.Dataset) -> float:
    units = dataset.attrs.get("units", "um")
    units = units.decode() if isinstance(units, bytes) else str(units)
    if units not in _LENGTH_TO_UM:
        raise VolumeInputError(f"{dataset.name}: unsupported length unit {units!r}")
    return float(np.asarray(dataset[()]).reshape(-1)[0]) * _LENGTH_TO_UM[units]


def _index_for(indices: np.ndarray) -> slice | np.ndarray:
    # h5py reads a contiguous slice far faster than a fancy index.
    if indices.size and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def _nominal_axis_offset_um(raw: h5py.File) -> tuple[float | None, bool]:
    """The scan's nominal axis offset (um, None if unrecorded) and whether the file says half acquisition."""
    offset_um: float | None = None
    if "/entry/sample/rotation_axis_offset" in raw:  # written by corrflow.formats.nexus, authoritative
        offset_um = _length_um(raw["/entry/sample/rotation_axis_offset"])
    elif "/entry/corrflow_metadata/settings" in raw:  # an older or foreign writer that kept our settings
        try:
            settings = json.loads(raw["/entry/corrflow_metadata/settings"][()])
            value = settings.get("parameters", {}).get("axis_offset_um")
            offset_um = None if value is None else float(value)
        except (ValueError, TypeError, AttributeError):
            offset_um = None  # foreign or malformed metadata: no nominal offset, not an error
    half = False
    if "/entry/instrument/detector/field_of_view" in raw:
        text = raw["/entry/instrument/detector/field_of_view"][()]
        half = (text.decode() if isinstance(text, bytes) else str(text)).strip().lower() == "half"
    if offset_um is not None and offset_um != 0.0:
        half = True
    return offset_um, half


@contextmanager
def _sha256_in_background(path: Path, linked: list[Path]) -> Iterator[tuple[Future[str], Future[dict[str, str]]]]:
    """The file's sha256 and those of the files it links its frames from, computed on a thread beside
    the reconstruction: for a large scan that is seconds of reading no slab needs to wait for. On an
    error the caller does not wait for them."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corrflow-input-sha256")
    try:
        own = executor.submit(sha256_file, path, chunk_bytes=HASH_CHUNK_BYTES)
        sources = executor.submit(lambda: {str(p): sha256_file(p, chunk_bytes=HASH_CHUNK_BYTES) for p in linked})
        yield own, sources
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _resolve_phase_retrieval(
    raw: h5py.File, requested: PhaseRetrieval, pixel_size_um: float
) -> tuple[PhaseRetrieval, dict[str, Any]]:
    """Fill in the energy and distance from the file and the default padding; return it and its record."""
    sources: dict[str, str] = {}
    energy_keV = requested.energy_keV
    sources["energy_from"] = "parameter"
    if energy_keV is None:
        name = "/entry/instrument/monochromator/energy"
        if name not in raw:
            raise VolumeInputError(f"{name}: missing; phase retrieval needs the photon energy (give energy_keV)")
        units = raw[name].attrs.get("units", "keV")
        units = units.decode() if isinstance(units, bytes) else str(units)
        if units not in ("keV", "eV"):
            raise VolumeInputError(f"{name}: unsupported energy unit {units!r}")
        energy_keV = float(np.asarray(raw[name][()]).reshape(-1)[0]) * (1e-3 if units == "eV" else 1.0)
        sources["energy_from"] = name
    distance_mm = requested.distance_mm
    sources["distance_from"] = "parameter"
    if distance_mm is None:
        name = "/entry/instrument/detector/distance"
        if name not in raw:
            raise VolumeInputError(f"{name}: missing; phase retrieval needs the propagation distance (give distance_mm)")
        distance_mm = _length_um(raw[name]) * 1e-3
        sources["distance_from"] = name
    for label, value, source in (("energy", energy_keV, sources["energy_from"]),
                                 ("distance", distance_mm, sources["distance_from"])):
        if not (np.isfinite(value) and value > 0):
            raise VolumeInputError(f"{source}: phase retrieval needs a positive {label}, got {value}")
    resolved = PhaseRetrieval(delta_beta=requested.delta_beta, energy_keV=energy_keV, distance_mm=distance_mm)
    length_um = resolved.length_um()
    pad_px = requested.pad_px
    if pad_px is None:
        pad_px = int(np.ceil(PAGANIN_PAD_LENGTHS * length_um / pixel_size_um))
    resolved = PhaseRetrieval(delta_beta=requested.delta_beta, energy_keV=energy_keV, distance_mm=distance_mm,
                              pad_px=int(pad_px))
    record = {
        "method": "Paganin single-distance phase retrieval (Paganin et al. 2002), before the logarithm",
        "delta_beta": resolved.delta_beta,
        "energy_keV": energy_keV,
        "distance_mm": distance_mm,
        **sources,
        "paganin_length_um": length_um,
        "pad_px": resolved.pad_px,
        "pad_from": "parameter" if requested.pad_px is not None else f"{PAGANIN_PAD_LENGTHS:g} Paganin lengths",
    }
    return resolved, record


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]  # JSON has no NaN


def _estimate_resolution(raw: h5py.File, job: SlabJob, *, filter_name: str, threshold: str) -> dict[str, Any]:
    """The half-dataset resolution of the job's rows, processed as a slab is, as a provenance block.

    One Fourier ring correlation per row (even vs odd projections), averaged ring by ring over the rows
    and compared with the threshold for the rows' pixels together (the rows' noise is independent
    without phase retrieval; Paganin's 2-D filter correlates neighbouring rows, which makes the pooled
    threshold slightly optimistic).
    """
    try:
        sinograms = slab_sinograms(raw, job)
    except ValueError as exc:  # the kernels' checks of the data: name the file and rows
        raise VolumeInputError(
            f"{job.nxtomo_path}: /entry/instrument/detector/data rows {job.r0}..{job.r1 - 1}: {exc}"
        ) from exc
    sinograms, angles_deg, center_px = _as_180(job, sinograms)
    block: dict[str, Any] = {
        "method": "Fourier ring correlation of the reconstructions from the even and the odd projections "
                  "(van Heel & Schatz 2005), averaged over the rows",
        "rows": [job.r0, job.r1],
        "threshold": threshold,
        "of": "one half-dataset (every other projection); the full scan resolves at least as finely",
    }
    try:
        estimates = [
            half_dataset_resolution(row, angles_deg, center_px=center_px, pixel_size_um=job.pixel_size_um,
                                    filter_name=filter_name, threshold=threshold)  # type: ignore[arg-type]
            for row in sinograms
        ]
    except ValueError as exc:  # too few projections or columns to split and correlate: no estimate
        return {**block, "estimated": False, "reason": str(exc)}
    correlations = np.stack([e.curve.correlation for e in estimates])
    finite = np.isfinite(correlations)
    with np.errstate(invalid="ignore"):  # a ring with no power in any row stays NaN
        mean = np.where(finite, correlations, 0.0).sum(axis=0) / finite.sum(axis=0)
    first = estimates[0].curve
    curve = FourierCorrelation(
        frequency_per_um=first.frequency_per_um, correlation=mean,
        n_pixels=np.sum([e.curve.n_pixels for e in estimates], axis=0),
    )
    estimate = resolution_from_curve(curve, threshold=threshold)  # type: ignore[arg-type]
    return {
        **block,
        "estimated": True,
        "resolution_um": estimate.resolution_um,
        "crossing_frequency_per_um": estimate.frequency_per_um,
        "reached_nyquist": estimate.reached_nyquist,
        "curve": {"frequency_per_um": _finite_or_none(curve.frequency_per_um),
                  "correlation": _finite_or_none(curve.correlation), "n_pixels": curve.n_pixels.tolist()},
    }


def software_versions() -> dict[str, str]:
    import scipy

    return {"corrflow": corrflow.__version__, "numpy": np.__version__, "scipy": scipy.__version__, "h5py": h5py.__version__}


def reconstruct_nxtomo(
    nxtomo_path: Path,
    output_path: Path,
    *,
    filter_name: str = "shepp-logan",
    center_px: float | None = None,
    chunk_rows: int = 8,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    map_slabs: SlabMapper = sequential_slabs,
    threads: int | None = None,
    half_acquisition: bool | None = None,
    phase_retrieval: PhaseRetrieval | None = None,
    ring_removal_size_px: int | None = None,
    resolution: bool = True,
    resolution_threshold: Literal["half-bit", "1/7"] = "half-bit",
) -> VolumeProduct:
    """Normalize, centre and back-project every detector row of an NXtomo scan.

    Parameters
    ----------
    nxtomo_path
        Raw scan (NeXus NXtomo: ``/entry/instrument/detector/{data,image_key,x_pixel_size}``,
        ``/entry/sample/rotation_angle`` in degrees).
    output_path
        Volume file to create; must not exist.
    filter_name, center_px
        FBP filter; rotation-axis column on the detector (px, 0-based; for an offset-centre scan the
        column near the detector edge). ``None`` finds it from the middle rows.
    chunk_rows
        Detector rows per slab (bounds memory).
    provenance
        Extra provenance (e.g. the input run uid), stored with the volume.
    progress
        Called as ``progress(rows_done, rows_total)`` after each slab.
    map_slabs
        Runs the slab jobs and yields ``(job, slab)`` in job order: :func:`sequential_slabs` here, or
        one that spreads them over workers (the reconstruction flow's Dask mapper); it should keep
        a bounded number of slabs in flight, which bounds memory.
    threads
        FBP threads per slab (None = all cores).
    half_acquisition
        Offset-centre 360° scan (axis near a detector edge): ``None`` (default) decides from the file
        (a recorded non-zero ``rotation_axis_offset`` / ``axis_offset_um``, or ``field_of_view``
        "Half"); ``True`` / ``False`` override it. It needs angles over a full turn.
    phase_retrieval
        Paganin retrieval of every projection (None = plain ``-ln``); its energy and distance default to
        the file's, its padding to :data:`PAGANIN_PAD_LENGTHS` Paganin lengths (see the module docstring).
    ring_removal_size_px
        Ring (stripe) removal on the sinograms (with phase retrieval: before the filter, see the module
        docstring): the median width across detector columns (px, odd, >= 3, < n_cols; wider than
        twice the widest stripe). None = off.
    resolution, resolution_threshold
        Estimate the half-dataset resolution from the middle :data:`RESOLUTION_ROWS` rows (on by
        default) with this threshold of :mod:`corrflow.processing.resolution`.

    Returns
    -------
    VolumeProduct
        Volume shape ``(rows, n, n)`` as ``(z, y, x)``, voxel = detector pixel, ``n = cols`` (or the
        widened field of an offset-centre scan); ``acquisition`` says which case it was;
        ``resolution_um`` the half-dataset resolution (µm), None if not estimated.

    Raises
    ------
    VolumeInputError
        Missing or inconsistent datasets, no projections/flats/darks, a centre off the detector,
        half acquisition asked for a scan that does not cover a full turn, phase retrieval without an
        energy or a positive distance, or a ring-removal width the detector cannot take.
    """
    nxtomo_path, output_path = Path(nxtomo_path), Path(output_path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if resolution_threshold not in ("half-bit", "1/7"):
        raise ValueError(f"resolution_threshold must be 'half-bit' or '1/7', got {resolution_threshold!r}")
    if ring_removal_size_px is not None and (
        int(ring_removal_size_px) != ring_removal_size_px or ring_removal_size_px < 3 or ring_removal_size_px % 2 == 0
    ):
        raise ValueError(f"ring_removal_size_px must be an odd integer >= 3 or None, got {ring_removal_size_px!r}")
    if output_path.exists():
        raise FileExistsError(f"{output_path} exists: a reconstruction is never overwritten")
    start = time.perf_counter()
    linked = linked_files(nxtomo_path)
    missing = [str(p) for p in linked if not p.is_file()]
    if missing:  # HDF5 would read the frames of a missing file as zeros
        raise VolumeInputError(f"{nxtomo_path}: its frames are linked from files that are not there: {missing}")
    with _sha256_in_background(nxtomo_path, linked) as (input_sha256, linked_sha256), h5py.File(nxtomo_path, "r") as raw:
        try:
            data = raw["/entry/instrument/detector/data"]
            image_key = np.asarray(raw["/entry/instrument/detector/image_key"][()])
            angles_all = np.asarray(raw["/entry/sample/rotation_angle"][()], dtype=np.float64)
            pixel_size_um = _length_um(raw["/entry/instrument/detector/x_pixel_size"])
        except KeyError as exc:
            raise VolumeInputError(f"{nxtomo_path}: missing NXtomo dataset ({exc})") from None
        if data.ndim != 3:
            raise VolumeInputError(f"{data.name}: expected (frames, rows, cols), got shape {data.shape}")
        n_frames, n_rows, n_cols = data.shape
        for name, values in (("image_key", image_key), ("rotation_angle", angles_all)):
            if values.shape != (n_frames,):
                raise VolumeInputError(f"{name}: {values.shape[0] if values.ndim else 0} values for {n_frames} frames")
        proj_idx = np.flatnonzero(image_key == IMAGE_KEY_PROJECTION)
        flat_idx = np.flatnonzero(image_key == IMAGE_KEY_FLAT)
        dark_idx = np.flatnonzero(image_key == IMAGE_KEY_DARK)
        for label, idx in (("projections (image_key 0)", proj_idx), ("flats (image_key 1)", flat_idx), ("darks (image_key 2)", dark_idx)):
            if idx.size == 0:
                raise VolumeInputError(f"{data.name}: no {label}")
        if proj_idx.size < 2:
            raise VolumeInputError(f"{data.name}: at least 2 projections are needed, found {proj_idx.size}")
        angles_deg = angles_all[proj_idx]
        if not np.all(np.isfinite(angles_deg)):
            raise VolumeInputError("rotation_angle: non-finite angles")
        full_turn = covers_full_turn(angles_deg)
        nominal_offset_um, recorded_half = _nominal_axis_offset_um(raw)
        half = recorded_half if half_acquisition is None else bool(half_acquisition)
        if half and not full_turn:
            raise VolumeInputError(
                f"rotation_angle: half acquisition (offset centre) needs projections over a full turn, got "
                f"{angles_deg.min():.1f}..{angles_deg.max():.1f} deg"
            )

        if ring_removal_size_px is not None and ring_removal_size_px >= n_cols:
            raise VolumeInputError(
                f"ring_removal_size_px ({ring_removal_size_px}) must be smaller than the detector width ({n_cols} columns)"
            )
        phase: PhaseRetrieval | None = None
        phase_record: dict[str, Any] | None = None
        if phase_retrieval is not None:
            phase, phase_record = _resolve_phase_retrieval(raw, phase_retrieval, pixel_size_um)

        flat = reference_field(data[_index_for(flat_idx)], name="flats")
        dark = reference_field(data[_index_for(dark_idx)], name="darks")

        def job(r0: int, r1: int, centre: float, output_size: int | None = None, *, processed: bool = True) -> SlabJob:
            template = SlabJob(
                nxtomo_path=str(nxtomo_path), r0=r0, r1=r1, projection_index=_index_for(proj_idx),
                flat_rows=flat[:0], dark_rows=dark[:0], angles_deg=angles_deg, center_px=centre,
                filter_name=filter_name, pixel_size_um=pixel_size_um, threads=threads,
                half_acquisition=half, output_size=output_size, detector_rows=n_rows,
                phase_retrieval=phase if processed else None,
                ring_removal_size_px=ring_removal_size_px if processed else None,
            )
            lo, hi = template.read_rows
            return dataclasses.replace(template, flat_rows=flat[lo:hi], dark_rows=dark[lo:hi])

        axis_correlation: float | None = None
        if center_px is None:
            mid = n_rows // 2
            # Plain line integrals: the centre does not need phase retrieval, and the fringes help.
            middle = _line_integral_slab(raw, job(max(0, mid - 2), min(n_rows, mid + 2), 0.0, processed=False))
            if half:
                # The nominal offset gives the side and a generous window: the true axis differs by
                # the alignment error of the centred position.
                search: dict[str, Any] = {}
                if nominal_offset_um:
                    nominal = (n_cols - 1) / 2 + nominal_offset_um / pixel_size_um
                    search = {"side": "right" if nominal_offset_um > 0 else "left",
                              "search_center_px": nominal, "search_radius_px": max(8.0, n_cols / 4)}
                try:
                    axis = find_axis_360(middle, angles_deg, **search)
                except ValueError as exc:
                    raise VolumeInputError(f"offset-centre axis: {exc}") from None
                center_px, axis_correlation = axis.center_px, axis.correlation
            else:
                center_px = float(np.median([find_rotation_center(s, angles_deg) for s in middle]))
        if not (0.0 <= center_px <= n_cols - 1):
            raise VolumeInputError(f"centre {center_px:.2f} px lies outside the detector (0..{n_cols - 1})")
        width = n_cols
        conversion: dict[str, Any] = {}
        if half:
            try:
                geometry = half_acquisition_geometry(n_cols=n_cols, center_px=center_px)
            except ValueError as exc:
                raise VolumeInputError(f"offset-centre scan: {exc}") from None
            width = geometry.width_px
            conversion = {
                "conversion": "360 deg offset-centre -> 180 deg sinogram, halves blended linearly over the overlap",
                "overlap_px": geometry.overlap_px,
                "axis_side": geometry.side,
                "center_180_px": geometry.center_180_px,
                "n_projections_reconstructed": int(np.sum(angles_deg - angles_deg.min() < 180.0 - 1e-6)),
                "axis_correlation": axis_correlation,
            }
        acquisition = "360-half" if half else ("360" if full_turn else "180")
        resolution_block: dict[str, Any] | None = None
        if resolution:
            k = min(RESOLUTION_ROWS, n_rows)
            r_mid = (n_rows - k) // 2
            resolution_block = _estimate_resolution(
                raw, job(r_mid, r_mid + k, center_px), filter_name=filter_name, threshold=resolution_threshold
            )
        ring_record = None if ring_removal_size_px is None else {
            "method": "sorting-based stripe removal (Vo, Atwood & Drakopoulos 2018, algorithm 3) on the sinograms",
            "size_px": int(ring_removal_size_px),
        }

        partial = output_path.with_name(output_path.name + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            partial.unlink()  # a previous attempt died mid-write; it was never a finished product
        try:
            jobs = [
                job(r0, min(n_rows, r0 + chunk_rows), center_px, None if width == n_cols else width)
                for r0 in range(0, n_rows, chunk_rows)
            ]
            _write_volume(
                partial, map_slabs(jobs), n_rows=n_rows, n_cols=width, pixel_size_um=pixel_size_um,
                progress=progress,
                record=lambda: {
                    "input_file": str(nxtomo_path),
                    "input_sha256": input_sha256.result(),
                    "linked_input_sha256": linked_sha256.result(),
                    "parameters": {
                        "filter_name": filter_name,
                        "center_px": center_px,
                        "chunk_rows": chunk_rows,
                        "voxel_size_um": pixel_size_um,
                        "n_projections": int(proj_idx.size),
                        "acquisition": acquisition,
                        "scan_range_deg": float(np.ptp(angles_deg) + np.median(np.abs(np.diff(np.sort(angles_deg))))),
                        "axis_offset_um": nominal_offset_um,
                        "detector_cols": n_cols,
                        "volume_width_px": width,
                        **conversion,
                        "phase_retrieval": phase_record,
                        "ring_removal": ring_record,
                    },
                    "resolution": resolution_block,
                    "software": software_versions(),
                    "created": datetime.now(timezone.utc).isoformat(),
                    **(provenance or {}),
                },
            )
        except BaseException:
            partial.unlink(missing_ok=True)  # never leave a half-written volume behind
            raise
    os.replace(partial, output_path)
    return VolumeProduct(
        path=output_path,
        center_px=float(center_px),
        voxel_size_um=pixel_size_um,
        shape_zyx=(n_rows, width, width),
        input_sha256=input_sha256.result(),
        seconds=time.perf_counter() - start,
        acquisition=acquisition,
        resolution_um=(resolution_block or {}).get("resolution_um"),
        linked_sha256=linked_sha256.result(),
    )


def _write_volume(
    partial: Path,
    slabs: Iterator[tuple[SlabJob, np.ndarray]],
    *,
    n_rows: int,
    n_cols: int,
    pixel_size_um: float,
    progress: Callable[[int, int], None] | None,
    record: Callable[[], dict[str, Any]],
) -> None:
    """Write the NXdata volume slab by slab, then the provenance record (made once the slabs are in)."""
    with h5py.File(partial, "w-") as out:
        entry = out.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        nxdata = entry.create_group("data")
        nxdata.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": ["z", "y", "x"]})
        volume = nxdata.create_dataset(
            "data", shape=(n_rows, n_cols, n_cols), dtype="float32", chunks=(1, n_cols, n_cols)
        )
        volume.attrs.update({"units": "1/mm", "long_name": "linear attenuation coefficient"})
        for axis, n in (("z", n_rows), ("y", n_cols), ("x", n_cols)):
            coords = nxdata.create_dataset(axis, data=((np.arange(n) - (n - 1) / 2) * pixel_size_um).astype("float32"))
            coords.attrs["units"] = "um"
        done = 0
        for job, values in slabs:
            volume[job.r0 : job.r1] = values
            done += job.r1 - job.r0
            if progress is not None:
                progress(done, n_rows)
        if done != n_rows:
            raise RuntimeError(f"only {done} of {n_rows} rows were reconstructed")
        process = entry.create_group("process")
        process.attrs["NX_class"] = "NXprocess"
        process.create_dataset("program", data="corrflow reconstruct (FBP)")
        process.create_dataset("version", data=corrflow.__version__)
        process.create_dataset("provenance", data=json.dumps(record()))


def read_provenance(volume_path: Path) -> dict[str, Any]:
    """The provenance record stored with a reconstructed volume."""
    with h5py.File(volume_path, "r") as f:
        return json.loads(f["/entry/process/provenance"][()])
