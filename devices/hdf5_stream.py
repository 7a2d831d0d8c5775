"""Area detectors that write frames to HDF5 and announce them with StreamResource/StreamDatum.

:class:`StreamingDetector` is the shared base of the simulated X-ray and microscope detectors.
It implements bluesky's ``WritesStreamAssets`` protocol the way ophyd-async's HDF writers do:

- ``stage()`` opens a new file ``<data_dir>/<name>_<uid>.h5`` (mode ``"w-"``: never overwrites)
  with one extendable dataset ``/entry/data/data`` of shape ``(N, rows, cols)``, one frame per
  chunk, in SWMR mode so readers (Tiled) can open it while frames arrive;
- ``trigger()`` exposes for ``exposure_s`` simulated seconds on a background thread, computes one
  frame (subclasses: :meth:`StreamingDetector._acquire_frame`) and appends it
  (:class:`corrflow.formats.hdf5_frames.HDF5FrameWriter`, flushed before each StreamDatum announces it);
- ``describe()`` declares the image data key as ``"external": "STREAM:"``; ``read()`` holds only
  scalars (the frame number), never the image;
- ``collect_asset_docs()`` yields one ``stream_resource`` per staged file, then one
  ``stream_datum`` for the frames not yet announced; the RunEngine fills in the descriptor and
  sequence numbers;
- ``unstage()`` closes the file.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import numpy as np
from event_model import StreamDatum, StreamResource
from ophyd import Component as Cpt
from ophyd import Device
from ophyd.status import DeviceStatus

from corrflow.devices.clock import SimClock
from corrflow.devices.signals import ConfigSignal, ReadbackSignal, positive_finite
from corrflow.devices.stream_assets import (
    ATTRIBUTES_PATH,
    DATASET_PATH,
    HDF5_MIMETYPE,
    announced_attributes,
    attribute_descriptions,
    stream_asset_docs,
)
from corrflow.formats.hdf5_frames import HDF5FrameWriter

__all__ = ["ATTRIBUTES_PATH", "DATASET_PATH", "HDF5_MIMETYPE", "HDF5FrameWriter", "StreamingDetector", "fly_request", "new_uid"]


def new_uid() -> str:
    """A new globally unique id (as bluesky's ``new_uid``)."""
    return str(uuid4())


FlyRequest = tuple[int, float, tuple[Any, float] | None]
"""``(num_frames, period_s, (positioner, start position) or None)``."""


def fly_request(device: Device, value: Mapping[str, Any] | None, *, exposure_s: float) -> FlyRequest | None:
    """Check a ``prepare`` value.

    ``None`` (one frame per trigger) or ``{"num_frames": n >= 1, "period_s": p >= exposure_s}``
    with optionally ``"start": (positioner, position)``: the frames begin when that axis passes
    that position (angle-triggered start), otherwise at ``kickoff()``.
    """
    if device._staged.value != "no":
        raise RuntimeError(f"{device.name}: prepare() before stage(), not while staged")
    if value is None:
        return None
    if not isinstance(value, Mapping) or not {"num_frames", "period_s"} <= set(value) <= {"num_frames", "period_s", "start"}:
        raise ValueError(
            f"{device.name}: prepare() takes None or {{'num_frames': n, 'period_s': p[, 'start': (axis, position)]}}, got {value!r}"
        )
    start = value.get("start")
    if start is not None:
        if not (isinstance(start, tuple) and len(start) == 2 and hasattr(start[0], "SUB_READBACK") and math.isfinite(start[1])):
            raise ValueError(f"{device.name}: start must be (positioner, position), got {start!r}")
        start = (start[0], float(start[1]))
    frames, period_s = value["num_frames"], value["period_s"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"{device.name}: num_frames must be an integer >= 1, got {frames!r}")
    if not (isinstance(period_s, int | float) and math.isfinite(period_s) and period_s >= exposure_s):
        raise ValueError(f"{device.name}: period_s must be >= the exposure ({exposure_s} s), got {period_s!r}")
    return int(frames), float(period_s), start


_ARM_TIMEOUT_WALL_S = 60.0
"""Longest wall-clock wait for the start axis of an armed fly scan to pass its start position."""


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
    frame_attribute_keys: ClassVar[Mapping[str, tuple[str, str]]] = {}
    """Per-frame values the detector writes with every frame, step and fly scans alike:
    ``{data key suffix: (NDAttribute name, units)}``. A fly scan announces them all as data keys
    ``{name}_{suffix}``; a step scan the :attr:`step_attribute_suffixes` (the rest its event reads
    from the devices themselves, which stand still while it exposes)."""
    step_attribute_suffixes: ClassVar[tuple[str, ...]] = ()
    """Attributes a step scan's event takes from the frame (the state of its own exposure)."""

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
        self._exposure_thread: threading.Thread | None = None
        self._exposure_timeout_s = 0.0
        self._stream_resource_uid: str | None = None
        self._resource_announced = False
        self._frames_announced = 0
        self._datum_count = 0
        self._fly_request: FlyRequest | None = None
        self._fly_frames: int | None = None
        self._fly_period_s = 0.0
        self._fly_start: tuple[Any, float] | None = None
        self._fly_status: DeviceStatus | None = None
        self._attribute_uids: dict[str, str] = {}
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
        request = self._fly_request
        try:
            self._open_writer(attribute_names=tuple(attribute for attribute, _ in self.frame_attribute_keys.values()))
        except BaseException:
            super().unstage()
            raise
        with self._lock:
            # Every frame's attributes are in the file; these are announced with it.
            self._attribute_uids = {f"{self.name}_{suffix}": new_uid() for suffix in self._announced_attributes(fly=request is not None)}
            if request is None:
                self._fly_frames = None
            else:
                self._fly_frames, self._fly_period_s, self._fly_start = request
        return staged

    def _open_writer(self, *, attribute_names: tuple[str, ...]) -> None:
        path = self._data_dir / f"{self.name}_{new_uid()}.h5"
        writer = HDF5FrameWriter(path, frame_shape=self._frame_shape, dtype=self.frame_dtype, attribute_names=attribute_names)
        with self._lock:
            self._writer = writer
            self._stream_resource_uid = new_uid()
            self._resource_announced = False
            self._frames_announced = 0
            self._datum_count = 0
        self.last_file_path = writer.path
        self.frame_number.put(0, internal=True)

    def unstage(self) -> list[Any]:
        thread = self._exposure_thread
        if thread is not None and thread is not threading.current_thread():
            # An exposure in flight (e.g. when an abort unstages) lands in the file first: unstaging
            # never discards a frame, nor fails the trigger status the RunEngine may still hold.
            thread.join(self._exposure_timeout_s)
        with self._lock:
            writer, self._writer = self._writer, None
            self._fly_frames = None
            self._fly_request = None
            self._attribute_uids = {}
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
        thread = threading.Thread(
            target=self._acquire, args=(exposure_s, inputs, status), name=f"{self.name}-acquire", daemon=True
        )
        self._exposure_thread, self._exposure_timeout_s = thread, self._clock.timeout_s(exposure_s)
        thread.start()
        return status

    def _acquire(self, exposure_s: float, inputs: dict[str, Any], status: DeviceStatus) -> None:
        try:
            self._clock.sleep(exposure_s)
            # A step scan's frame: the stage stands still, so the exposure starts and ends in the
            # state read when it was triggered; its attributes are written with it.
            inputs, attributes = self._frame_inputs(inputs, inputs)
            frame = self._acquire_frame(exposure_s=exposure_s, inputs=inputs)
            attributes = {**attributes, "TimeStamp": time.time(), "AcquireTime": exposure_s}
            with self._lock:
                if self._writer is None:
                    raise RuntimeError(f"{self.name}: unstaged during an exposure; the frame was not written")
                n_frames = self._writer.append(frame, {**attributes, "UniqueId": float(self._writer.n_frames + 1)})
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
        """The readings of a step scan's event: the image and the frame's own attributes (external)."""
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
        description.update(self._attribute_descriptions(fly=False))
        return description

    def _announced_attributes(self, *, fly: bool) -> dict[str, tuple[str, str]]:
        return announced_attributes(self.frame_attribute_keys, self.step_attribute_suffixes, fly=fly)

    def _attribute_descriptions(self, *, fly: bool) -> dict[str, dict[str, Any]]:
        return attribute_descriptions(self.name, self._announced_attributes(fly=fly), source_prefix=f"SIM:{self.name}:")

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, StreamResource | StreamDatum]]:
        """Yield the stream resource(s) of the open file once, then a datum for new frames.

        A step scan announces the frame of the latest trigger only (one frame per event, as
        :class:`~corrflow.devices.epics_detector.EpicsAreaDetector`); a frame left behind by a
        suspension is never announced. A fly scan (``prepare`` with frames, then ``stage``)
        announces every frame written since the last call. The frames' own attributes are
        announced with them, each as a data key ``{name}_{suffix}`` of :attr:`frame_attribute_keys`.

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
            if written > writer.n_flushed:
                writer.flush()  # a reader told about a frame must be able to read it
            announce_resource = not self._resource_announced
            start = self._frames_announced
            if self._fly_frames is None:
                # A step scan's event holds the frame of its own trigger: the latest one. A frame
                # taken before a suspension and re-taken after it stays in the file, unannounced.
                start = max(start, written - 1)
            datum_number = self._datum_count
            if announce_resource:
                self._resource_announced = True
            if written > start:
                self._frames_announced = written
                self._datum_count += 1
            uids = {self.image_data_key: self._stream_resource_uid, **self._attribute_uids}
        rows, cols = self._frame_shape
        datasets = {self.image_data_key: DATASET_PATH}
        chunks = {self.image_data_key: [1, rows, cols]}
        for suffix, (attribute, _units) in self.frame_attribute_keys.items():
            datasets[f"{self.name}_{suffix}"] = f"{ATTRIBUTES_PATH}/{attribute}"
            chunks[f"{self.name}_{suffix}"] = [256]
        yield from stream_asset_docs(
            path=writer.path,
            resource_uids=uids,
            datasets=datasets,
            chunk_shapes=chunks,
            announce_resources=announce_resource,
            start=start,
            stop=written,
            datum_number=datum_number,
        )

    # -- fly scans ---------------------------------------------------------------------------------
    def _frame_inputs(self, start: dict[str, Any], end: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """The inputs of a frame exposed between states ``start`` and ``end``, and its attributes."""
        return start, {}

    def _exposure_inputs_at(self, time_s: float) -> dict[str, Any]:
        """The instrument state at simulated time ``time_s`` (default: now); fly scans use it."""
        return self._exposure_inputs()

    def prepare(self, value: Mapping[str, Any] | None) -> DeviceStatus:
        """Choose what the next staging opens (bluesky ``Preparable``; before ``stage()``).

        Parameters
        ----------
        value
            ``{"num_frames": n, "period_s": p}``: a fly scan of ``n`` frames started by
            ``kickoff()``, one every ``p`` simulated seconds (``p`` >= the exposure), each
            recording :attr:`frame_attribute_keys`; ``None``: one frame per ``trigger()``.

        Raises
        ------
        ValueError
            Bad counts or period; RuntimeError when already staged.
        """
        self._fly_request = fly_request(self, value, exposure_s=float(self.exposure_s.get()))
        status = DeviceStatus(self, timeout=self._clock.timeout_s(0.0))
        status.set_finished()
        return status

    def kickoff(self) -> DeviceStatus:
        """Start (or arm, with a start position) the prepared frames; the status finishes at once.

        Armed, the frames begin when the start axis's next move passes the start position: the
        time of passage comes from the simulated axis' exact trajectory, so the frames begin at
        the right angle whatever the wall-clock latencies.
        """
        with self._lock:
            frames = self._fly_frames
            if frames is None or self._writer is None:
                raise RuntimeError(f"{self.name}: prepare({{'num_frames': n, 'period_s': p}}) and stage() before kickoff()")
            if self._acquiring:
                raise RuntimeError(f"{self.name}: kickoff() while acquiring")
            self._acquiring = True
        period_s = self._fly_period_s
        exposure_s = float(self.exposure_s.get())
        armed_s = self._clock.now_s()
        self._fly_status = DeviceStatus(self, timeout=self._clock.timeout_s(frames * period_s) + _ARM_TIMEOUT_WALL_S)
        threading.Thread(
            target=self._fly,
            args=(frames, period_s, exposure_s, self._fly_status, self._fly_start, armed_s),
            name=f"{self.name}-fly",
            daemon=True,
        ).start()
        started = DeviceStatus(self, timeout=self._clock.timeout_s(0.0))
        started.set_finished()
        return started

    def complete(self) -> DeviceStatus:
        """The status of the fly acquisition: finished when every frame is in the file."""
        if self._fly_status is None:
            raise RuntimeError(f"{self.name}: kickoff() before complete()")
        return self._fly_status

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        """Data keys of the fly stream: the image and the per-frame attributes (all external)."""
        return {self.image_data_key: self.describe()[self.image_data_key], **self._attribute_descriptions(fly=True)}

    def _wait_for_start(self, start: tuple[Any, float], armed_s: float) -> float:
        motor, position = start
        if not hasattr(motor, "time_passing"):
            raise TypeError(f"{self.name}: a simulated fly scan starts on a simulated axis, got {type(motor).__name__}")
        deadline = time.monotonic() + _ARM_TIMEOUT_WALL_S
        while True:
            passing_s = motor.time_passing(position, after_s=armed_s)
            if passing_s is not None:
                return passing_s
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {motor.name} did not pass {position} within {_ARM_TIMEOUT_WALL_S} s")
            time.sleep(0.001)

    def _fly(
        self, frames: int, period_s: float, exposure_s: float, status: DeviceStatus, start_at: tuple[Any, float] | None, armed_s: float
    ) -> None:
        clock = self._clock
        try:
            t0 = clock.now_s() if start_at is None else self._wait_for_start(start_at, armed_s)
            for k in range(frames):
                begin_s = t0 + k * period_s
                # The geometry at the exposure's own simulated times; the write happens no sooner.
                clock.sleep(begin_s + exposure_s - clock.now_s())
                start = self._exposure_inputs_at(begin_s)
                end = self._exposure_inputs_at(begin_s + exposure_s)
                inputs, attributes = self._frame_inputs(start, end)
                attributes = {**attributes, "TimeStamp": time.time(), "UniqueId": float(k + 1), "AcquireTime": exposure_s}
                frame = self._acquire_frame(exposure_s=exposure_s, inputs=inputs)
                with self._lock:
                    if self._writer is None:
                        raise RuntimeError(f"{self.name}: unstaged during a fly scan; frame {k} was not written")
                    n_frames = self._writer.append(frame, attributes)
                self.frame_number.put(n_frames, internal=True)
        except BaseException as exc:  # the status carries the error to whoever waits on it
            with self._lock:
                self._acquiring = False
            status.set_exception(exc)
            return
        with self._lock:
            self._acquiring = False
        status.set_finished()
