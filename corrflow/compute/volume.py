"""Reconstruct an NXtomo file into a volume file, chunk by chunk, with provenance.

Reads the raw NXtomo in slabs of detector rows, so memory stays bounded by a few copies of one
slab of ``n_projections * chunk_rows * n_cols`` float32, plus the flat and dark means
(``2 * rows * cols`` float32), one output slab (``chunk_rows * width**2`` float32) and a 1 MiB hash
buffer, whatever the size of the scan (tests/test_volume.py measures it). The volume is written as NeXus ``NXdata`` (``/entry/data/data``,
axes ``z, y, x``, mu in 1/mm) under a temporary name and renamed only when complete, so a
half-written volume never looks finished.

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

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import corrflow
from corrflow.processing.centering import find_rotation_center
from corrflow.processing.fbp import fbp_volume
from corrflow.processing.normalize import line_integrals, reference_field
from corrflow.processing.sinogram360 import (
    covers_full_turn,
    find_axis_360,
    half_acquisition_geometry,
    sinogram_360_to_180,
)
from corrflow.formats.checksums import sha256_file

IMAGE_KEY_PROJECTION, IMAGE_KEY_FLAT, IMAGE_KEY_DARK = 0, 1, 2
HASH_CHUNK_BYTES = 1 << 20  # hashing the input is I/O bound: a small buffer costs no speed
_LENGTH_TO_UM = {"um": 1.0, "micrometer": 1.0, "micron": 1.0, "mm": 1e3, "millimeter": 1e3, "m": 1e6, "meter": 1e6}


class VolumeInputError(ValueError):
    """The raw file cannot be reconstructed; the message names the dataset and the problem."""


@dataclass(frozen=True)
class VolumeProduct:
    """A finished volume: ``center_px`` is the rotation-axis column on the DETECTOR (px)."""

    path: Path
    center_px: float
    voxel_size_um: float
    shape_zyx: tuple[int, int, int]
    input_sha256: str
    seconds: float
    acquisition: str = "180"  # "180", "360" (centred) or "360-half" (offset centre, widened field)


@dataclass(frozen=True)
class SlabJob:
    """Everything one worker needs to reconstruct detector rows ``[r0, r1)``; it reads them itself.

    Only the flat/dark rows of the slab travel with the job (small), never the projections.
    """

    nxtomo_path: str
    r0: int
    r1: int
    projection_index: slice | np.ndarray
    flat_rows: np.ndarray  # (r1 - r0, cols) float32
    dark_rows: np.ndarray
    angles_deg: np.ndarray
    center_px: float
    filter_name: str
    pixel_size_um: float
    threads: int | None = None  # FBP threads; 1 per Dask worker thread avoids oversubscribing cores
    # Offset-centre 360° scan: convert each sinogram to 180° (axis center_px on the detector) first.
    half_acquisition: bool = False
    output_size: int | None = None  # reconstruction grid (px); None = n_cols


SlabMapper = Callable[[Iterable[SlabJob]], Iterator[tuple[SlabJob, np.ndarray]]]


def _line_integral_slab(raw: h5py.File, job: SlabJob) -> np.ndarray:
    raw_slab = raw["/entry/instrument/detector/data"][job.projection_index, job.r0 : job.r1, :]
    mu_t = line_integrals(raw_slab, job.flat_rows[None], job.dark_rows[None])
    return np.ascontiguousarray(mu_t.transpose(1, 0, 2))  # (rows, angles, cols)


def reconstruct_slab(job: SlabJob) -> np.ndarray:
    """Read, normalize and back-project one slab; returns ``(r1 - r0, n, n)`` float32, mu in 1/mm,
    ``n = job.output_size`` (default the detector width)."""
    try:
        with h5py.File(job.nxtomo_path, "r") as raw:
            sinograms = _line_integral_slab(raw, job)
        angles_deg, center_px = job.angles_deg, job.center_px
        if job.half_acquisition:
            half = sinogram_360_to_180(sinograms, angles_deg, center_px=center_px)
            sinograms, angles_deg, center_px = half.sinograms, half.angles_deg, half.center_px
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
def _sha256_in_background(path: Path) -> Iterator[Future[str]]:
    """The file's sha256, computed on a thread beside the reconstruction: for a large scan that is
    seconds of reading no slab needs to wait for. On an error the caller does not wait for it."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corrflow-input-sha256")
    try:
        yield executor.submit(sha256_file, path, chunk_bytes=HASH_CHUNK_BYTES)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


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

    Returns
    -------
    VolumeProduct
        Volume shape ``(rows, n, n)`` as ``(z, y, x)``, voxel = detector pixel, ``n = cols`` (or the
        widened field of an offset-centre scan); ``acquisition`` says which case it was.

    Raises
    ------
    VolumeInputError
        Missing or inconsistent datasets, no projections/flats/darks, a centre off the detector, or
        half acquisition asked for a scan that does not cover a full turn.
    """
    nxtomo_path, output_path = Path(nxtomo_path), Path(output_path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if output_path.exists():
        raise FileExistsError(f"{output_path} exists: a reconstruction is never overwritten")
    start = time.perf_counter()
    with _sha256_in_background(nxtomo_path) as input_sha256, h5py.File(nxtomo_path, "r") as raw:
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

        flat = reference_field(data[_index_for(flat_idx)], name="flats")
        dark = reference_field(data[_index_for(dark_idx)], name="darks")

        def job(r0: int, r1: int, centre: float, output_size: int | None = None) -> SlabJob:
            return SlabJob(
                nxtomo_path=str(nxtomo_path), r0=r0, r1=r1, projection_index=_index_for(proj_idx),
                flat_rows=flat[r0:r1], dark_rows=dark[r0:r1], angles_deg=angles_deg, center_px=centre,
                filter_name=filter_name, pixel_size_um=pixel_size_um, threads=threads,
                half_acquisition=half, output_size=output_size,
            )

        axis_correlation: float | None = None
        if center_px is None:
            mid = n_rows // 2
            middle = _line_integral_slab(raw, job(max(0, mid - 2), min(n_rows, mid + 2), 0.0))
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
                    },
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
