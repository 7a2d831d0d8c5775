"""Reconstruct an NXtomo file into a volume file, chunk by chunk, with provenance.

Reads the raw NXtomo in slabs of detector rows, so memory stays bounded by a few copies of one
slab of ``n_projections * chunk_rows * n_cols`` float32, plus the flat and dark means
(``2 * rows * cols`` float32), one output slab (``chunk_rows * cols**2`` float32) and a 1 MiB hash
buffer, whatever the size of the scan (tests/test_volume.py measures it). The volume is written as NeXus ``NXdata`` (``/entry/data/data``,
axes ``z, y, x``, mu in 1/mm) under a temporary name and renamed only when complete, so a
half-written volume never looks finished.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
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
from corrflow.transfer import sha256_file

IMAGE_KEY_PROJECTION, IMAGE_KEY_FLAT, IMAGE_KEY_DARK = 0, 1, 2
HASH_CHUNK_BYTES = 1 << 20  # hashing the input is I/O bound: a small buffer costs no speed
_LENGTH_TO_UM = {"um": 1.0, "micrometer": 1.0, "micron": 1.0, "mm": 1e3, "millimeter": 1e3, "m": 1e6, "meter": 1e6}


class VolumeInputError(ValueError):
    """The raw file cannot be reconstructed; the message names the dataset and the problem."""


@dataclass(frozen=True)
class VolumeProduct:
    path: Path
    center_px: float
    voxel_size_um: float
    shape_zyx: tuple[int, int, int]
    input_sha256: str
    seconds: float


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


SlabMapper = Callable[[Iterable[SlabJob]], Iterator[tuple[SlabJob, np.ndarray]]]


def _line_integral_slab(raw: h5py.File, job: SlabJob) -> np.ndarray:
    raw_slab = raw["/entry/instrument/detector/data"][job.projection_index, job.r0 : job.r1, :]
    mu_t = line_integrals(raw_slab, job.flat_rows[None], job.dark_rows[None])
    return np.ascontiguousarray(mu_t.transpose(1, 0, 2))  # (rows, angles, cols)


def reconstruct_slab(job: SlabJob) -> np.ndarray:
    """Read, normalize and back-project one slab; returns ``(r1 - r0, cols, cols)`` float32, mu in 1/mm."""
    with h5py.File(job.nxtomo_path, "r") as raw:
        sinograms = _line_integral_slab(raw, job)
    return fbp_volume(
        sinograms, job.angles_deg, center_px=job.center_px, filter_name=job.filter_name,
        pixel_size_um=job.pixel_size_um, workers=job.threads,
    )


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
        FBP filter; rotation-axis column (px, 0-based). ``None`` finds it from the middle rows.
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

    Returns
    -------
    VolumeProduct
        Volume shape ``(rows, cols, cols)`` as ``(z, y, x)``, voxel = detector pixel.
    """
    nxtomo_path, output_path = Path(nxtomo_path), Path(output_path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if output_path.exists():
        raise FileExistsError(f"{output_path} exists: a reconstruction is never overwritten")
    start = time.perf_counter()
    input_sha256 = sha256_file(nxtomo_path, chunk_bytes=HASH_CHUNK_BYTES)
    with h5py.File(nxtomo_path, "r") as raw:
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

        flat = reference_field(data[_index_for(flat_idx)], name="flats")
        dark = reference_field(data[_index_for(dark_idx)], name="darks")

        def job(r0: int, r1: int, centre: float) -> SlabJob:
            return SlabJob(
                nxtomo_path=str(nxtomo_path), r0=r0, r1=r1, projection_index=_index_for(proj_idx),
                flat_rows=flat[r0:r1], dark_rows=dark[r0:r1], angles_deg=angles_deg, center_px=centre,
                filter_name=filter_name, pixel_size_um=pixel_size_um, threads=threads,
            )

        if center_px is None:
            mid = n_rows // 2
            middle = _line_integral_slab(raw, job(max(0, mid - 2), min(n_rows, mid + 2), 0.0))
            center_px = float(np.median([find_rotation_center(s, angles_deg) for s in middle]))
        if not (0.0 <= center_px <= n_cols - 1):
            raise VolumeInputError(f"centre {center_px:.2f} px lies outside the detector (0..{n_cols - 1})")

        partial = output_path.with_name(output_path.name + ".part")
        partial.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            partial.unlink()  # a previous attempt died mid-write; it was never a finished product
        try:
            jobs = [job(r0, min(n_rows, r0 + chunk_rows), center_px) for r0 in range(0, n_rows, chunk_rows)]
            _write_volume(
                partial, map_slabs(jobs), n_rows=n_rows, n_cols=n_cols, pixel_size_um=pixel_size_um,
                progress=progress,
                record={
                    "input_file": str(nxtomo_path),
                    "input_sha256": input_sha256,
                    "parameters": {
                        "filter_name": filter_name,
                        "center_px": center_px,
                        "chunk_rows": chunk_rows,
                        "voxel_size_um": pixel_size_um,
                        "n_projections": int(proj_idx.size),
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
        shape_zyx=(n_rows, n_cols, n_cols),
        input_sha256=input_sha256,
        seconds=time.perf_counter() - start,
    )


def _write_volume(
    partial: Path,
    slabs: Iterator[tuple[SlabJob, np.ndarray]],
    *,
    n_rows: int,
    n_cols: int,
    pixel_size_um: float,
    progress: Callable[[int, int], None] | None,
    record: dict[str, Any],
) -> None:
    """Write the NXdata volume slab by slab, then the provenance record."""
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
        process.create_dataset("provenance", data=json.dumps(record))


def read_provenance(volume_path: Path) -> dict[str, Any]:
    """The provenance record stored with a reconstructed volume."""
    with h5py.File(volume_path, "r") as f:
        return json.loads(f["/entry/process/provenance"][()])
