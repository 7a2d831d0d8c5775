"""Area detectors that write frames to HDF5 and announce them with StreamResource/StreamDatum.

:class:`StreamingDetector` is the shared base of the simulated X-ray and microscope detectors.
It implements bluesky's ``WritesStreamAssets`` protocol the way ophyd-async's HDF writers do:

- ``stage()`` opens a new file ``<data_dir>/<name>_<uid>.h5`` (mode ``"w-"``: never overwrites)
  with one extendable dataset ``/entry/data/data`` of shape ``(N, rows, cols)``, one frame per
  chunk, in SWMR mode so readers (Tiled) can open it while frames arrive;
- ``trigger()`` exposes for ``exposure_s`` simulated seconds on a background thread, computes one
  frame (subclasses: :meth:`StreamingDetector._acquire_frame`), appends and flushes it;
- ``describe()`` declares the image data key as ``"external": "STREAM:"``; ``read()`` holds only
  scalars (the frame number), never the image;
- ``collect_asset_docs()`` yields one ``stream_resource`` per staged file, then one
  ``stream_datum`` for the frames not yet announced; the RunEngine fills in the descriptor and
  sequence numbers;
- ``unstage()`` closes the file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import h5py
import numpy as np
from event_model import StreamDatum, StreamRange, StreamResource
from ophyd import Component as Cpt
from ophyd import Device
from ophyd.status import DeviceStatus

from corrflow.devices.clock import SimClock
from corrflow.devices.signals import ConfigSignal, ReadbackSignal, positive_finite

__all__ = ["DATASET_PATH", "HDF5_MIMETYPE", "HDF5FrameWriter", "StreamingDetector", "new_uid"]

DATASET_PATH = "/entry/data/data"
HDF5_MIMETYPE = "application/x-hdf5"


def new_uid() -> str:
    """A new globally unique id (as bluesky's ``new_uid``)."""
    return str(uuid4())


class HDF5FrameWriter:
    """Appends equally shaped frames to ``/entry/data/data`` of a new HDF5 file.

    Parameters
    ----------
    path
        File to create; it must not exist.
    frame_shape
        ``(rows, cols)`` of every frame.
    dtype
        Numpy dtype of the frames.

    Raises
    ------
    FileExistsError
        ``path`` exists (files are never overwritten).
    """

    def __init__(self, path: Path, *, frame_shape: tuple[int, int], dtype: np.dtype | type) -> None:
        self.path = Path(path).absolute()
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = np.dtype(dtype)
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
            # No new objects may be created after this; readers may now open the file.
            self._file.swmr_mode = True
        except BaseException:
            self._file.close()
            self._file = None
            raise
        self.n_frames = 0

    @property
    def closed(self) -> bool:
        return self._file is None

    def append(self, frame: np.ndarray) -> int:
        """Append one frame and flush it to disk; returns the number of frames in the file."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is closed")
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} != detector shape {self.frame_shape}")
        if frame.dtype != self.dtype:
            raise ValueError(f"frame dtype {frame.dtype} != detector dtype {self.dtype}")
        self._dataset.resize(self.n_frames + 1, axis=0)
        self._dataset[self.n_frames] = frame
        self._dataset.flush()
        self.n_frames += 1
        return self.n_frames

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StreamingDetector(Device):
    """Base of simulated area detectors writing HDF5 frames announced as stream assets.

    Subclasses set :attr:`frame_dtype` and implement :meth:`_exposure_inputs` (snapshot of the
    instrument state at the start of an exposure, taken on the caller's thread) and
    :meth:`_acquire_frame` (the frame for that state, computed on the acquisition thread).

    Parameters
    ----------
    name
        Device name; the image data key is ``{name}_image``.
    data_dir
        Directory for the HDF5 files (created on ``stage()``).
    clock
        Simulated clock (exposure time runs on it).
    frame_shape_px
        ``(rows, cols)`` of each frame.

    Notes
    -----
    Components: ``frame_number`` (normal, frames written to the current file), ``exposure_s``
    (config, simulated seconds, > 0), ``shape_px`` (config, ``[rows, cols]``).
    """

    frame_dtype: ClassVar[np.dtype] = np.dtype(np.uint16)

    frame_number = Cpt(ReadbackSignal, value=0, kind="normal")
    exposure_s = Cpt(ConfigSignal, value=0.1, kind="config", units="s", check=positive_finite)
    shape_px = Cpt(ReadbackSignal, value=[0, 0], kind="config", units="px")

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        data_dir: Path | str,
        clock: SimClock,
        frame_shape_px: tuple[int, int],
        **kwargs: Any,
    ) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        rows, cols = (int(n) for n in frame_shape_px)
        if rows < 1 or cols < 1:
            raise ValueError(f"{name}: frame_shape_px must be positive (rows, cols), got {frame_shape_px!r}")
        self._frame_shape = (rows, cols)
        self.shape_px.put([rows, cols], internal=True)
        self._data_dir = Path(data_dir).absolute()
        self._clock = clock
        # Guards the writer against unstage() while an acquisition thread is appending.
        self._lock = threading.Lock()
        self._writer: HDF5FrameWriter | None = None
        self._acquiring = False
        self._stream_resource_uid: str | None = None
        self._resource_announced = False
        self._frames_announced = 0
        self._datum_count = 0
        self.last_file_path: Path | None = None

    # -- facts ------------------------------------------------------------------------------
    @property
    def image_data_key(self) -> str:
        """Data key of the (external) image in descriptors and stream resources."""
        return f"{self.name}_image"

    @property
    def frame_shape_px(self) -> tuple[int, int]:
        return self._frame_shape

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def clock(self) -> SimClock:
        return self._clock

    # -- subclass hooks ---------------------------------------------------------------------
    def _exposure_inputs(self) -> dict[str, Any]:
        """Snapshot of the instrument state for the next frame (called on the caller's thread)."""
        raise NotImplementedError

    def _acquire_frame(self, *, exposure_s: float, inputs: dict[str, Any]) -> np.ndarray:
        """One frame, shape ``frame_shape_px``, dtype ``frame_dtype`` (acquisition thread)."""
        raise NotImplementedError

    # -- bluesky staging ---------------------------------------------------------------------
    def stage(self) -> list[Any]:
        staged = super().stage()  # raises RedundantStaging if already staged
        path = self._data_dir / f"{self.name}_{new_uid()}.h5"
        try:
            writer = HDF5FrameWriter(path, frame_shape=self._frame_shape, dtype=self.frame_dtype)
        except BaseException:
            super().unstage()
            raise
        with self._lock:
            self._writer = writer
            self._stream_resource_uid = new_uid()
            self._resource_announced = False
            self._frames_announced = 0
            self._datum_count = 0
        self.last_file_path = writer.path
        self.frame_number.put(0, internal=True)
        return staged

    def unstage(self) -> list[Any]:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        return super().unstage()

    # -- acquisition ---------------------------------------------------------------------------
    def trigger(self) -> DeviceStatus:
        """Start one exposure; the status finishes when the frame is on disk.

        Raises
        ------
        RuntimeError
            The detector is not staged (no file to write to) or an exposure is in progress.
        """
        with self._lock:
            if self._writer is None:
                raise RuntimeError(f"{self.name}: stage() the detector before trigger() (no file is open)")
            if self._acquiring:
                raise RuntimeError(f"{self.name}: trigger() while an exposure is in progress")
            self._acquiring = True
        exposure_s = self.exposure_s.get()
        try:
            inputs = self._exposure_inputs()
        except BaseException:
            with self._lock:
                self._acquiring = False
            raise
        status = DeviceStatus(self, timeout=self._clock.timeout_s(exposure_s))
        threading.Thread(
            target=self._acquire, args=(exposure_s, inputs, status), name=f"{self.name}-acquire", daemon=True
        ).start()
        return status

    def _acquire(self, exposure_s: float, inputs: dict[str, Any], status: DeviceStatus) -> None:
        try:
            self._clock.sleep(exposure_s)
            frame = self._acquire_frame(exposure_s=exposure_s, inputs=inputs)
            with self._lock:
                if self._writer is None:
                    raise RuntimeError(f"{self.name}: unstaged during an exposure; the frame was not written")
                n_frames = self._writer.append(frame)
        except BaseException as exc:  # the status carries the error to whoever waits on it
            with self._lock:
                self._acquiring = False
            status.set_exception(exc)
            return
        with self._lock:
            self._acquiring = False
        self.frame_number.put(n_frames, internal=True)
        status.set_finished()

    def get_index(self) -> int:
        """Frames written to the current file (0 when not staged)."""
        with self._lock:
            return 0 if self._writer is None else self._writer.n_frames

    # -- documents -----------------------------------------------------------------------------
    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        rows, cols = self._frame_shape
        description[self.image_data_key] = {
            "source": f"SIM:{self.name}:image",
            "dtype": "array",
            "dtype_numpy": self.frame_dtype.str,
            "shape": [rows, cols],
            "dims": ["row", "column"],
            "external": "STREAM:",
        }
        return description

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, StreamResource | StreamDatum]]:
        """Yield the stream resource of the open file once, then a datum for new frames.

        Parameters
        ----------
        index
            Announce frames up to this index (exclusive); default: all frames written.
        """
        with self._lock:
            writer = self._writer
            if writer is None or self._stream_resource_uid is None:
                return
            written = writer.n_frames if index is None else min(int(index), writer.n_frames)
            resource_uid = self._stream_resource_uid
            announce_resource = not self._resource_announced
            start = self._frames_announced
            datum_number = self._datum_count
            if announce_resource:
                self._resource_announced = True
            if written > start:
                self._frames_announced = written
                self._datum_count += 1
        rows, cols = self._frame_shape
        if announce_resource:
            resource: StreamResource = {
                "uid": resource_uid,
                "data_key": self.image_data_key,
                "mimetype": HDF5_MIMETYPE,
                "uri": f"file://localhost{writer.path}",
                "parameters": {"dataset": DATASET_PATH, "chunk_shape": [1, rows, cols], "swmr": True},
            }
            yield "stream_resource", resource
        if written > start:
            datum: StreamDatum = {
                "uid": f"{resource_uid}/{datum_number}",
                "stream_resource": resource_uid,
                "descriptor": "",  # the RunEngine fills in the descriptor uid
                "indices": StreamRange(start=start, stop=written),
                "seq_nums": StreamRange(start=0, stop=0),  # the RunEngine fills in the event numbers
            }
            yield "stream_datum", datum
