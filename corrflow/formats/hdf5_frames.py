"""One writer of detector frames into HDF5, shared by the simulated detectors and the detector IOC.

The layout is areaDetector's NDFileHDF5 default: frames in ``/entry/data/data`` of shape
``(n_frames, rows, cols)``, one frame per chunk, and the per-frame NDAttributes in
``/entry/instrument/NDAttributes/<name>`` (``(n_frames,)`` float64). The file is in SWMR mode from
creation, so a reader (Tiled, a live viewer) can open it while frames arrive.

Flushing: a flush makes every frame written so far visible to SWMR readers, but costs a metadata
write per dataset. As areaDetector's ``NumFramesFlush`` and ``FlushNow``, the writer flushes when
``flush_interval_s`` has passed since the last flush, and whenever :meth:`HDF5FrameWriter.flush`
is called: whoever announces frames to readers (a StreamDatum) calls it first, so no reader is ever
told about a frame it cannot see. ``flush_interval_s=0`` flushes after every frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

__all__ = ["ATTRIBUTES_PATH", "DATASET_PATH", "DEFAULT_FLUSH_INTERVAL_S", "HDF5FrameWriter"]

DATASET_PATH = "/entry/data/data"
ATTRIBUTES_PATH = "/entry/instrument/NDAttributes"
DEFAULT_FLUSH_INTERVAL_S = 0.5
"""Longest time a written frame stays invisible to SWMR readers when nobody asks for a flush."""


class HDF5FrameWriter:
    """Appends equally shaped frames (and their NDAttributes) to a new SWMR HDF5 file.

    Parameters
    ----------
    path
        File to create; it must not exist (files are never overwritten).
    frame_shape
        ``(rows, cols)`` of every frame, pixels.
    dtype
        Numpy dtype of the frames.
    attribute_names
        NDAttributes recorded with each frame (float64; NaN where a frame lacks one).
    flush_interval_s
        Flush after a frame when this many seconds (monotonic clock) have passed since the last
        flush; 0 flushes after every frame. See the module notes.

    Raises
    ------
    FileExistsError
        ``path`` exists.
    ValueError
        A negative or non-finite ``flush_interval_s``.
    """

    def __init__(
        self,
        path: Path,
        *,
        frame_shape: tuple[int, int],
        dtype: np.dtype | type,
        attribute_names: Sequence[str] = (),
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
    ) -> None:
        if not math.isfinite(flush_interval_s) or flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must be a finite number >= 0, got {flush_interval_s!r}")
        self.path = Path(path).absolute()
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = np.dtype(dtype)
        self.flush_interval_s = float(flush_interval_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "w-" fails if the file exists; libver "latest" is required for SWMR.
        self._file: h5py.File | None = h5py.File(self.path, "w-", libver="latest")
        try:
            entry = self._file.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            self._dataset = data.create_dataset(
                "data",
                shape=(0, *self.frame_shape),
                maxshape=(None, *self.frame_shape),
                chunks=(1, *self.frame_shape),
                dtype=self.dtype,
            )
            self._attributes: dict[str, h5py.Dataset] = {}
            if attribute_names:
                instrument = entry.create_group("instrument")
                instrument.attrs["NX_class"] = "NXinstrument"
                group = instrument.create_group("NDAttributes")
                group.attrs["NX_class"] = "NXcollection"
                for name in attribute_names:
                    self._attributes[name] = group.create_dataset(
                        name, shape=(0,), maxshape=(None,), chunks=(256,), dtype=np.float64
                    )
            # No new objects may be created after this; readers may now open the file.
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            self._file = None
            raise
        self._pending_attributes: list[list[float]] = []
        self.n_frames = 0
        self.n_flushed = 0
        self._last_flush = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._file is None

    def append(self, frame: np.ndarray, attributes: Mapping[str, float] | None = None) -> int:
        """Append one frame and its attribute values; returns the number of frames in the file.

        The frame is flushed now if ``flush_interval_s`` has passed since the last flush.
        """
        if self._file is None:
            raise RuntimeError(f"{self.path} is closed")
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} != detector shape {self.frame_shape}")
        if frame.dtype != self.dtype:
            raise ValueError(f"frame dtype {frame.dtype} != detector dtype {self.dtype}")
        n = self.n_frames
        if self._attributes:
            # Attribute values wait in memory for the next flush, which writes them as one block per
            # NDAttribute: a reader sees them exactly when it sees their frames.
            self._pending_attributes.append([float((attributes or {}).get(name, math.nan)) for name in self._attributes])
        self._dataset.resize(n + 1, axis=0)
        # One frame is exactly one unfiltered chunk: writing it as the chunk's bytes skips HDF5's
        # selection and type-conversion machinery (the frame's dtype was checked above).
        self._dataset.id.write_direct_chunk((n, 0, 0), np.ascontiguousarray(frame))
        self.n_frames = n + 1
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()
        return self.n_frames

    def flush(self) -> int:
        """Make every frame written so far visible to SWMR readers; returns how many that is."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is closed")
        if self.n_flushed != self.n_frames:
            self._write_pending_attributes()
            self._file.flush()
            self.n_flushed = self.n_frames
        self._last_flush = time.monotonic()
        return self.n_flushed

    def _write_pending_attributes(self) -> None:
        if not self._pending_attributes:
            return
        values = np.asarray(self._pending_attributes, dtype=np.float64)  # (new frames, attributes)
        start = self.n_frames - len(values)
        for column, dataset in enumerate(self._attributes.values()):
            dataset.resize(self.n_frames, axis=0)
            dataset[start:] = values[:, column]
        self._pending_attributes.clear()

    def close(self) -> None:
        """Flush and close (idempotent).

        Every HDF5 object of the file is released here, on the calling thread, even when the flush
        or the close fails (a full disk): an object released later by the garbage collector, on
        whatever thread runs it, can crash the HDF5 library once a write has failed.
        """
        if self._file is None:
            return
        file = self._file
        try:
            self._write_pending_attributes()
        finally:
            self._file, self._dataset, self._attributes = None, None, {}
            self._pending_attributes.clear()
            try:
                file.close()
            finally:
                del file
        self.n_flushed = self.n_frames
