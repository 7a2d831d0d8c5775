"""An areaDetector-like simulated camera IOC: a ``cam1:`` driver and an ``HDF1:`` file plugin.

PV names follow EPICS areaDetector (ADCore's ``ADBase.template`` and ``NDFileHDF5.template``),
restricted to what corrflow's devices use, with ``_RBV`` readbacks:

``cam1:``  ``Acquire`` (put-callback completes when the acquisition is over), ``Acquire_RBV``,
``AcquireTime``, ``AcquirePeriod``, ``NumImages``, ``ImageMode`` (Single, Multiple, Continuous),
``TriggerMode`` (Internal; External is refused: no trigger input is simulated),
``ArrayCounter``, ``NumImagesCounter_RBV``, ``DetectorState_RBV``, ``StatusMessage_RBV``,
``ArraySizeX_RBV``, ``ArraySizeY_RBV``, ``DataType_RBV``.

``HDF1:``  ``FilePath``, ``FileName``, ``FileNumber``, ``FileTemplate`` (C format applied to path,
name and number), ``AutoIncrement``, ``FileWriteMode`` (Stream only), ``CreateDirectory``,
``EnableCallbacks``, ``NumCapture`` (0 = until ``Capture`` is cleared), ``Capture``,
``NumCaptured_RBV``, ``FullFileName_RBV``, ``FilePathExists_RBV``, ``WriteStatus``,
``WriteMessage``, ``ArrayCounter_RBV``, ``FlushNow`` (put 1: flush now; the put completes after
the flush) and ``FlushInterval`` (s between automatic flushes).

The plugin writes what areaDetector's HDF5 plugin writes by default: frames in
``/entry/data/data`` (``(n, rows, cols)``, one frame per chunk) and one value per frame of each
NDAttribute in ``/entry/instrument/NDAttributes/<name>`` (``(n,)`` float64), in SWMR mode so
clients read frames while the file is open (:class:`corrflow.formats.hdf5_frames.HDF5FrameWriter`). The
file is flushed every ``FlushInterval`` seconds (areaDetector flushes every ``NumFramesFlush``
frames; time bounds a reader's wait at any frame rate) and on ``FlushNow``, which clients put
before they announce frames to readers. Files are created exclusively:
an existing file is never overwritten. As in areaDetector, a write that fails (a file that exists
or cannot be created, a full disk) is a status, not a failed put: ``Capture`` stays ``Done`` or
frames stop being captured, ``WriteStatus`` = "Write error" and ``WriteMessage`` says why.

Subclasses provide the physics: :meth:`AreaDetectorIOC.exposure_inputs` (the state of the
instrument when an exposure starts and ends) and :meth:`AreaDetectorIOC.compute_frame`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from caproto.server import PVGroup, SubGroup, pvproperty

from corrflow.formats.hdf5_frames import ATTRIBUTES_PATH, DATASET_PATH, HDF5FrameWriter
from corrflow.simulators.ioc.common import enum_property, long_string

__all__ = [
    "ATTRIBUTES_PATH",
    "AreaDetectorIOC",
    "CamGroup",
    "DATASET_PATH",
    "HDF5PluginGroup",
]

DATA_TYPES = ("Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float32", "Float64")
DETECTOR_STATES = ("Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting", "Error", "Waiting", "Initializing", "Disconnected", "Aborted")
_NUMPY_OF_DATA_TYPE = {name: np.dtype(name.lower()) for name in DATA_TYPES}


class CamGroup(PVGroup):
    """The ``cam1:`` driver PVs (prefix ``<detector>cam1:``)."""

    acquire = enum_property("Acquire", states=("Done", "Acquire"), doc="1 starts, 0 stops; put-callback completes when done")
    acquire_rbv = enum_property("Acquire_RBV", states=("Done", "Acquire"), read_only=True)
    acquire_time = pvproperty(name="AcquireTime", value=0.1, precision=4, doc="exposure time (s)")
    acquire_time_rbv = pvproperty(name="AcquireTime_RBV", value=0.1, precision=4, read_only=True)
    acquire_period = pvproperty(name="AcquirePeriod", value=0.0, precision=4, doc="frame period (s); at least AcquireTime")
    acquire_period_rbv = pvproperty(name="AcquirePeriod_RBV", value=0.0, precision=4, read_only=True)
    num_images = pvproperty(name="NumImages", value=1, doc="frames per acquisition in Multiple mode")
    num_images_rbv = pvproperty(name="NumImages_RBV", value=1, read_only=True)
    image_mode = enum_property("ImageMode", states=("Single", "Multiple", "Continuous"))
    image_mode_rbv = enum_property("ImageMode_RBV", states=("Single", "Multiple", "Continuous"), read_only=True)
    trigger_mode = enum_property("TriggerMode", states=("Internal", "External"))
    trigger_mode_rbv = enum_property("TriggerMode_RBV", states=("Internal", "External"), read_only=True)
    array_counter = pvproperty(name="ArrayCounter", value=0, doc="frames acquired (writable, as in areaDetector)")
    array_counter_rbv = pvproperty(name="ArrayCounter_RBV", value=0, read_only=True)
    num_images_counter_rbv = pvproperty(name="NumImagesCounter_RBV", value=0, read_only=True)
    detector_state_rbv = enum_property("DetectorState_RBV", states=DETECTOR_STATES, read_only=True)
    status_message_rbv = long_string("StatusMessage_RBV", read_only=True)
    array_size_x_rbv = pvproperty(name="ArraySizeX_RBV", value=0, read_only=True, doc="columns")
    array_size_y_rbv = pvproperty(name="ArraySizeY_RBV", value=0, read_only=True, doc="rows")
    data_type_rbv = enum_property("DataType_RBV", states=DATA_TYPES, value="UInt16", read_only=True)

    @array_size_x_rbv.startup
    async def array_size_x_rbv(self, instance: Any, async_lib: Any) -> None:
        detector: AreaDetectorIOC = self.parent
        rows, cols = detector.frame_shape
        await self.array_size_x_rbv.write(cols)
        await self.array_size_y_rbv.write(rows)
        name = next(name for name, dtype in _NUMPY_OF_DATA_TYPE.items() if dtype == detector.frame_dtype)
        await self.data_type_rbv.write(name)

    @acquire.putter
    async def acquire(self, instance: Any, value: Any) -> str:
        detector: AreaDetectorIOC = self.parent
        if value in ("Done", 0):
            detector.request_abort()
            return "Done"
        if detector.acquiring:
            raise RuntimeError(f"{instance.pvname}: an acquisition is in progress")
        # Show Acquire=1 now; the put-callback completes (and Acquire returns to 0) at the end.
        await instance.write("Acquire", verify_value=False)
        await detector.run_acquisition()
        return "Done"

    @acquire_time.putter
    async def acquire_time(self, instance: Any, value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and 0 < value <= 3600):
            raise ValueError(f"{instance.pvname}: exposure must be in (0, 3600] s, got {value}")
        return value

    @acquire_period.putter
    async def acquire_period(self, instance: Any, value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and 0 <= value <= 3600):
            raise ValueError(f"{instance.pvname}: period must be in [0, 3600] s, got {value}")
        return value

    @num_images.putter
    async def num_images(self, instance: Any, value: int) -> int:
        if int(value) < 1:
            raise ValueError(f"{instance.pvname}: NumImages must be >= 1, got {value}")
        return int(value)

    @trigger_mode.putter
    async def trigger_mode(self, instance: Any, value: str) -> str:
        if value not in ("Internal", 0):
            raise ValueError(f"{instance.pvname}: only Internal triggering is simulated, got {value!r}")
        return "Internal"


class HDF5PluginGroup(PVGroup):
    """The ``HDF1:`` file plugin PVs (prefix ``<detector>HDF1:``)."""

    file_path = long_string("FilePath", doc="directory (on the IOC host) of the next file")
    file_path_rbv = long_string("FilePath_RBV", read_only=True)
    file_path_exists_rbv = enum_property("FilePathExists_RBV", states=("No", "Yes"), read_only=True)
    create_directory = pvproperty(name="CreateDirectory", value=0, doc="non-zero: create FilePath on capture")
    create_directory_rbv = pvproperty(name="CreateDirectory_RBV", value=0, read_only=True)
    file_name = long_string("FileName", doc="base name of the next file")
    file_name_rbv = long_string("FileName_RBV", read_only=True)
    file_number = pvproperty(name="FileNumber", value=0)
    file_number_rbv = pvproperty(name="FileNumber_RBV", value=0, read_only=True)
    file_template = long_string("FileTemplate", value="%s%s_%6.6d.h5", doc="C format of path, name, number")
    file_template_rbv = long_string("FileTemplate_RBV", value="%s%s_%6.6d.h5", read_only=True)
    auto_increment = enum_property("AutoIncrement", states=("No", "Yes"))
    auto_increment_rbv = enum_property("AutoIncrement_RBV", states=("No", "Yes"), read_only=True)
    file_write_mode = enum_property("FileWriteMode", states=("Single", "Capture", "Stream"), value="Stream")
    file_write_mode_rbv = enum_property("FileWriteMode_RBV", states=("Single", "Capture", "Stream"), value="Stream", read_only=True)
    enable_callbacks = enum_property("EnableCallbacks", states=("Disable", "Enable"), value="Enable")
    enable_callbacks_rbv = enum_property("EnableCallbacks_RBV", states=("Disable", "Enable"), value="Enable", read_only=True)
    num_capture = pvproperty(name="NumCapture", value=0, doc="frames per file; 0 = until Capture is cleared")
    num_capture_rbv = pvproperty(name="NumCapture_RBV", value=0, read_only=True)
    num_captured_rbv = pvproperty(name="NumCaptured_RBV", value=0, read_only=True)
    capture = enum_property("Capture", states=("Done", "Capture"), doc="1 opens a file, 0 closes it")
    capture_rbv = enum_property("Capture_RBV", states=("Done", "Capture"), read_only=True)
    full_file_name_rbv = long_string("FullFileName_RBV", read_only=True)
    write_status = enum_property("WriteStatus", states=("Write OK", "Write error"), read_only=True)
    write_message = long_string("WriteMessage", read_only=True)
    array_counter_rbv = pvproperty(name="ArrayCounter_RBV", value=0, read_only=True, doc="frames received")
    flush_now = pvproperty(name="FlushNow", value=0, doc="put 1: flush the open file; completes after the flush")
    flush_interval = pvproperty(name="FlushInterval", value=0.5, precision=3, doc="s between automatic flushes; 0 = every frame")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writer: HDF5FrameWriter | None = None
        # h5py calls block: they run on one worker thread, in order, off the event loop.
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdf5")

    async def _run_io(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    @file_path.putter
    async def file_path(self, instance: Any, value: str) -> str:
        path = str(value)
        if path and not path.endswith("/"):
            path += "/"  # areaDetector appends the separator
        await self.file_path_exists_rbv.write("Yes" if Path(path).is_dir() else "No")
        return path

    @file_write_mode.putter
    async def file_write_mode(self, instance: Any, value: str) -> str:
        if value not in ("Stream", 2):
            raise ValueError(f"{instance.pvname}: only Stream mode is simulated, got {value!r}")
        return "Stream"

    @num_capture.putter
    async def num_capture(self, instance: Any, value: int) -> int:
        if int(value) < 0:
            raise ValueError(f"{instance.pvname}: NumCapture must be >= 0, got {value}")
        return int(value)

    @flush_now.putter
    async def flush_now(self, instance: Any, value: int) -> int:
        writer = self.writer
        if int(value) and writer is not None:
            try:
                await self._run_io(writer.flush)
            except (OSError, RuntimeError) as exc:  # a status, as every write failure (see handle_frame)
                await self._write_error(f"cannot flush {writer.path}: {exc}")
        return 0

    @flush_interval.putter
    async def flush_interval(self, instance: Any, value: float) -> float:
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"{instance.pvname}: FlushInterval must be a finite number >= 0, got {value}")
        return float(value)

    @capture.putter
    async def capture(self, instance: Any, value: Any) -> str:
        if value in ("Done", 0):
            await self._close()
            return "Done"
        if self.writer is not None:
            raise RuntimeError(f"{instance.pvname}: already capturing to {self.writer.path}")
        detector: AreaDetectorIOC = self.parent
        template = self.file_template.value
        try:
            filename = template % (self.file_path.value, self.file_name.value, int(self.file_number.value))
        except (TypeError, ValueError) as exc:
            # As NDFileHDF5: a file that cannot be opened leaves Capture at Done and says why in
            # WriteStatus/WriteMessage (the put itself completes).
            await self._write_error(f"FileTemplate {template!r} does not format path, name, number: {exc}")
            return "Done"
        path = Path(filename)
        try:
            if self.create_directory.value:
                await self._run_io(lambda: path.parent.mkdir(parents=True, exist_ok=True))
            writer = await self._run_io(
                lambda: HDF5FrameWriter(
                    path,
                    frame_shape=detector.frame_shape,
                    dtype=detector.frame_dtype,
                    attribute_names=detector.attribute_names,
                    flush_interval_s=float(self.flush_interval.value),
                )
            )
        except OSError as exc:
            await self._write_error(f"cannot create {path}: {exc}")
            return "Done"
        self.writer = writer
        await self.write_status.write("Write OK")
        await self.write_message.write("")
        await self.full_file_name_rbv.write(str(path))
        await self.num_captured_rbv.write(0)
        await self.file_path_exists_rbv.write("Yes")
        if self.auto_increment.value == "Yes":
            await self.file_number.write(int(self.file_number.value) + 1)
        return "Capture"

    async def _write_error(self, message: str) -> None:
        await self.write_status.write("Write error")
        await self.write_message.write(message[: 1000])

    async def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                await self._run_io(writer.close)
            except (OSError, RuntimeError) as exc:
                await self._write_error(f"cannot close {writer.path}: {exc}")

    async def handle_frame(self, frame: np.ndarray, attributes: Mapping[str, float]) -> None:
        """Receive one frame from the driver (areaDetector's NDArray callback)."""
        if self.enable_callbacks.value != "Enable":
            return
        await self.array_counter_rbv.write(self.array_counter_rbv.value + 1)
        writer = self.writer
        if writer is None:
            return
        try:
            n = await self._run_io(writer.append, frame, attributes)
        except (OSError, RuntimeError, ValueError) as exc:
            # As NDFileHDF5: a failed write is a status (the frame is not captured), not a failed
            # put of Acquire; the client sees NumCaptured stop and WriteMessage say why.
            await self._write_error(f"cannot append to {writer.path}: {exc}")
            return
        await self.num_captured_rbv.write(n)
        if 0 < self.num_capture.value <= n:
            await self._close()
            await self.capture.write("Done", verify_value=False)


class AreaDetectorIOC(PVGroup):
    """A camera with a file plugin; subclasses compute frames from the simulated physics.

    Subclasses set :attr:`frame_dtype`, :attr:`frame_shape` and :attr:`attribute_names` (before
    ``super().__init__``) and implement :meth:`exposure_inputs` and :meth:`compute_frame`. The
    IOC that serves a detector owns the :class:`~corrflow.simulators.ioc.common.SimControl`.
    """

    frame_dtype: ClassVar[np.dtype] = np.dtype(np.uint16)
    attribute_names: tuple[str, ...] = ()
    frame_shape: tuple[int, int] = (1, 1)

    cam = SubGroup(CamGroup, prefix="cam1:")
    hdf = SubGroup(HDF5PluginGroup, prefix="HDF1:")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquiring = False
        self._abort = asyncio.Event()
        # Frames are computed off the event loop so CA traffic (stop, abort, monitors) keeps flowing.
        self._compute = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="frames")

    # -- subclass hooks -------------------------------------------------------------------------
    async def exposure_inputs(self) -> dict[str, float]:
        """The instrument state now (read at the start and the end of each exposure)."""
        return {}

    def compute_frame(self, start: Mapping[str, float], end: Mapping[str, float], exposure_s: float) -> tuple[np.ndarray, dict[str, float]]:
        """The frame for an exposure between states ``start`` and ``end``, and its NDAttributes.

        Runs on a worker thread.
        """
        raise NotImplementedError

    # -- acquisition ------------------------------------------------------------------------------
    def request_abort(self) -> None:
        self._abort.set()

    async def _sleep_or_abort(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if an abort was requested meanwhile."""
        if seconds <= 0:
            return self._abort.is_set()
        try:
            await asyncio.wait_for(self._abort.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def run_acquisition(self) -> None:
        """Acquire the frames ``ImageMode``/``NumImages`` ask for, at ``AcquirePeriod``."""
        cam = self.cam
        mode = cam.image_mode.value
        n_frames = 1 if mode == "Single" else (int(cam.num_images.value) if mode == "Multiple" else math.inf)
        exposure_s = float(cam.acquire_time.value)
        period_s = max(float(cam.acquire_period.value), exposure_s)
        self.acquiring = True
        self._abort.clear()
        aborted = False
        loop = asyncio.get_running_loop()
        try:
            await cam.num_images_counter_rbv.write(0)
            await cam.detector_state_rbv.write("Acquire")
            await cam.status_message_rbv.write("Acquiring")
            next_start = loop.time()
            taken = 0
            while taken < n_frames:
                if await self._sleep_or_abort(next_start - loop.time()):
                    aborted = True
                    break
                next_start += period_s
                start = await self.exposure_inputs()
                if await self._sleep_or_abort(exposure_s):
                    aborted = True
                    break
                end = await self.exposure_inputs()
                frame, attributes = await loop.run_in_executor(self._compute, self.compute_frame, start, end, exposure_s)
                taken += 1
                counter = int(cam.array_counter.value) + 1
                attributes.update({"UniqueId": float(counter), "TimeStamp": time.time(), "AcquireTime": exposure_s})
                await cam.array_counter.write(counter)
                await cam.num_images_counter_rbv.write(taken)
                await self.hdf.handle_frame(frame, attributes)
        except Exception as exc:
            # The client's put-callback fails; the state says why for clients that only monitor.
            await cam.detector_state_rbv.write("Error")
            await cam.status_message_rbv.write(f"{type(exc).__name__}: {exc}"[:1000])
            raise
        finally:
            self.acquiring = False
        await cam.detector_state_rbv.write("Aborted" if aborted else "Idle")
        await cam.status_message_rbv.write("Acquisition aborted" if aborted else "Acquisition complete")
