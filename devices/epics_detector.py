"""areaDetector cameras over Channel Access, announcing the HDF5 the IOC writes as stream assets.

An :class:`EpicsAreaDetector` has the ``cam1:`` driver (:class:`CamDriver`) and the ``HDF1:`` file
plugin (:class:`HDF5FilePlugin`) of EPICS areaDetector, and the bluesky interface of the simulated
:class:`~corrflow.devices.hdf5_stream.StreamingDetector` (``WritesStreamAssets``):

- ``stage()`` sets the camera to one image per trigger and the plugin to stream into a new file
  ``<data_dir>/<name>_<uid>_000000.h5`` (created by the IOC, never overwritten), then opens it
  with ``Capture`` and checks that the IOC created it;
- ``trigger()`` writes ``Acquire`` = 1 with put completion (areaDetector completes the put when
  the acquisition is over); the status then checks on the IOC that the frame reached the file,
  and fails with the IOC's status message otherwise;
- ``describe()`` declares ``{name}_image`` as ``"external": "STREAM:"``; ``collect_asset_docs()``
  yields one ``stream_resource`` per file (``file://localhost<FullFileName_RBV>``, dataset
  ``/entry/data/data``) and one ``stream_datum`` per event, for the frame of the latest
  trigger (a frame left behind by a trigger whose event was never saved, e.g. when a suspended
  run rewinds, stays in the file and is not announced); the NDAttributes of
  ``step_attribute_suffixes`` (the X-ray camera: the rotation angle and ring current of the
  frame's own exposure) are announced with the frame, as stream data keys of their own;
- ``unstage()`` clears ``Capture``, which closes the file.

Fly scans (``prepare({"num_frames": n, "period_s": p})`` before ``stage()``, then
``kickoff``/``complete``/``collect_asset_docs``) acquire ``n`` frames at a fixed period. The IOC
records every frame's NDAttributes (rotation angle, translations, ring current, ... for the X-ray
camera) in ``/entry/instrument/NDAttributes``, step and fly scans alike; a fly scan announces all
of them as further stream data keys (``{name}_rotation_angle``, ...).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import numpy as np
from event_model import StreamDatum, StreamResource
from ophyd import Component as Cpt
from ophyd import Device
from ophyd.status import DeviceStatus, Status, SubscriptionStatus

from corrflow.devices.detectors import IMAGE_KEY_PROJECTION, XrayDetector, _check_image_key
from corrflow.devices.epics_base import (
    WRITE_TIMEOUT_S,
    Command,
    Readback,
    Setting,
    ensure_connected,
    put_and_wait,
    set_all,
)
from corrflow.devices.hdf5_stream import FlyRequest, fly_request
from corrflow.devices.microscope import MicroscopeDetector
from corrflow.devices.signals import ConfigSignal
from corrflow.devices.stream_assets import ATTRIBUTES_PATH, DATASET_PATH, announced_attributes, attribute_descriptions, stream_asset_docs

__all__ = [
    "ATTRIBUTES_PATH",
    "CamDriver",
    "DATASET_PATH",
    "EpicsAreaDetector",
    "EpicsMicroscopeDetector",
    "EpicsXrayDetector",
    "HDF5FilePlugin",
]

logger = logging.getLogger(__name__)

FILE_TEMPLATE = "%s%s_%6.6d.h5"
_TRIGGER_MARGIN_S = 10.0
_ARM_TIMEOUT_S = 60.0
_NUMPY_OF_DATA_TYPE = {
    name: np.dtype(name.lower())
    for name in ("Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float32", "Float64")
}


class CamDriver(Device):
    """areaDetector driver PVs (``cam1:``) that corrflow uses."""

    acquire = Command("Acquire", put_complete=True)
    acquire_rbv = Readback("Acquire_RBV")
    acquire_period = Setting("AcquirePeriod")
    num_images = Setting("NumImages")
    image_mode = Setting("ImageMode", string=True)
    trigger_mode = Setting("TriggerMode", string=True)
    array_counter = Setting("ArrayCounter", kind="omitted")
    num_images_counter = Readback("NumImagesCounter_RBV")
    detector_state = Readback("DetectorState_RBV", string=True)
    status_message = Readback("StatusMessage_RBV", string=True)
    array_size_x = Readback("ArraySizeX_RBV", kind="config")
    array_size_y = Readback("ArraySizeY_RBV", kind="config")
    data_type = Readback("DataType_RBV", kind="config", string=True)


class HDF5FilePlugin(Device):
    """areaDetector HDF5 file plugin PVs (``HDF1:``) that corrflow uses."""

    file_path = Setting("FilePath", string=True, kind="omitted")
    file_name = Setting("FileName", string=True, kind="omitted")
    file_number = Setting("FileNumber", kind="omitted")
    file_template = Setting("FileTemplate", string=True, kind="omitted")
    auto_increment = Setting("AutoIncrement", string=True, kind="omitted")
    file_write_mode = Setting("FileWriteMode", string=True, kind="omitted")
    create_directory = Setting("CreateDirectory", kind="omitted")
    enable_callbacks = Setting("EnableCallbacks", string=True, kind="omitted")
    num_capture = Setting("NumCapture", kind="omitted")
    capture = Command("Capture", put_complete=True)
    capture_rbv = Readback("Capture_RBV")
    num_captured = Readback("NumCaptured_RBV", auto_monitor=True)
    full_file_name = Readback("FullFileName_RBV", string=True)
    write_status = Readback("WriteStatus", string=True)
    write_message = Readback("WriteMessage", string=True)
    flush_now = Command("FlushNow", put_complete=True)


class EpicsAreaDetector(Device):
    """An areaDetector camera whose HDF5 plugin writes the frames; bluesky sees stream assets.

    Parameters
    ----------
    prefix
        Detector prefix, e.g. ``"BL:TOMO:det:"`` (``cam1:`` and ``HDF1:`` follow it).
    name
        Device name; the image data key is ``{name}_image``.
    data_dir
        Directory of the HDF5 files *on the IOC host* (here: the same machine); the IOC creates it.

    Notes
    -----
    Components: ``frame_number`` (normal, frames in the current file), ``exposure_s`` (config,
    ``cam1:AcquireTime``, s), ``cam`` and ``hdf`` (the areaDetector PVs).
    """

    frame_attribute_keys: ClassVar[Mapping[str, tuple[str, str]]] = {}
    """NDAttributes the IOC writes with every frame, announced as stream data keys: all of them in
    fly scans, :attr:`step_attribute_suffixes` in step scans: ``{suffix: (attribute, units)}``."""
    step_attribute_suffixes: ClassVar[tuple[str, ...]] = ()
    """Attributes a step scan's event takes from the frame (the state of its own exposure)."""

    cam = Cpt(CamDriver, "cam1:")
    hdf = Cpt(HDF5FilePlugin, "HDF1:")
    frame_number = Readback("HDF1:NumCaptured_RBV", kind="normal", auto_monitor=True)
    exposure_s = Setting("cam1:AcquireTime", kind="config")

    def __init__(self, prefix: str = "", *, name: str, data_dir: Path | str, **kwargs: Any) -> None:
        super().__init__(prefix=prefix, name=name, **kwargs)
        self._data_dir = Path(data_dir).absolute()
        self._lock = threading.Lock()
        self._file_path: Path | None = None
        self._resource_uids: dict[str, str] = {}
        self._resource_announced = False
        self._last_frame: int | None = None
        self._announced_until = 0
        self._datum_count = 0
        self._acquiring = False
        self._fly_request: FlyRequest | None = None
        self._fly_frames: int | None = None
        self._fly_start: tuple[Any, float] | None = None
        self.last_file_path: Path | None = None

    # -- facts ------------------------------------------------------------------------------
    @property
    def image_data_key(self) -> str:
        return f"{self.name}_image"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def frame_shape_px(self) -> tuple[int, int]:
        """``(rows, cols)`` from ``ArraySizeY_RBV`` and ``ArraySizeX_RBV``."""
        return (int(self.cam.array_size_y.get()), int(self.cam.array_size_x.get()))

    @property
    def frame_dtype(self) -> np.dtype:
        """Numpy dtype of the frames (``DataType_RBV``)."""
        return _NUMPY_OF_DATA_TYPE[self.cam.data_type.get()]

    @property
    def frame_geometry_signals(self) -> dict[str, Any]:
        """The IOC's frame geometry, for a plan's preflight to read through the RunEngine."""
        return {"rows": self.cam.array_size_y, "cols": self.cam.array_size_x, "data_type": self.cam.data_type}

    @staticmethod
    def itemsize_of_data_type(data_type: Any) -> int:
        """Bytes per pixel of an areaDetector ``DataType`` value."""
        return _NUMPY_OF_DATA_TYPE[data_type].itemsize

    def _timeout_s(self, frames: int = 1) -> float:
        exposure = float(self.exposure_s.get())
        period = max(exposure, float(self.cam.acquire_period.get()))
        return 2.0 * (exposure + (frames - 1) * period) + _TRIGGER_MARGIN_S

    # -- staging -----------------------------------------------------------------------------
    def stage(self) -> list[Any]:
        staged = super().stage()  # raises RedundantStaging if already staged
        request = self._fly_request
        try:
            if request is None:
                self._open_file(images_per_trigger=1, period_s=0.0)
            else:
                self._open_file(images_per_trigger=request[0], period_s=request[1])
        except BaseException:
            super().unstage()
            raise
        with self._lock:
            self._fly_frames = None if request is None else request[0]
            self._fly_start = None if request is None else request[2]
        return staged

    def prepare(self, value: Mapping[str, Any] | None) -> Status:
        """Choose what the next staging sets up (bluesky ``Preparable``; before ``stage()``).

        ``{"num_frames": n, "period_s": p}``: a fly scan (``ImageMode`` Multiple, ``NumImages`` n,
        ``AcquirePeriod`` p, started by ``kickoff()``), with ``"start": (axis, position)``
        armed to start when ``axis`` passes ``position``; ``None``: one frame per ``trigger()``.
        """
        self._fly_request = fly_request(self, value, exposure_s=float(self.exposure_s.get()))
        status = Status(self, timeout=WRITE_TIMEOUT_S)
        status.set_finished()
        return status

    def _open_file(self, *, images_per_trigger: int, period_s: float) -> None:
        cam, hdf = self.cam, self.hdf
        ensure_connected([cam.acquire, hdf.capture, hdf.full_file_name], self.name)
        if self._file_path is not None:
            raise RuntimeError(f"{self.name}: a file is already open: {self._file_path}")
        file_name = f"{self.name}_{uuid4()}"
        set_all(
            [
                (cam.image_mode, "Single" if images_per_trigger == 1 else "Multiple"),
                (cam.num_images, images_per_trigger),
                (cam.acquire_period, float(period_s)),
                (cam.trigger_mode, "Internal"),
                (hdf.enable_callbacks, "Enable"),
                (hdf.file_write_mode, "Stream"),
                (hdf.num_capture, 0),
                (hdf.auto_increment, "No"),
                (hdf.create_directory, 1),
                (hdf.file_path, f"{self._data_dir}/"),
                (hdf.file_name, file_name),
                (hdf.file_number, 0),
                (hdf.file_template, FILE_TEMPLATE),
            ]
        )
        put_and_wait(hdf.capture, 1, timeout_s=WRITE_TIMEOUT_S)
        status = hdf.write_status.get(use_monitor=False)
        full_name = hdf.full_file_name.get(use_monitor=False)
        expected = Path(FILE_TEMPLATE % (f"{self._data_dir}/", file_name, 0))
        if status != "Write OK" or int(hdf.capture_rbv.get(use_monitor=False)) != 1 or Path(full_name) != expected:
            message = hdf.write_message.get(use_monitor=False)
            raise RuntimeError(f"{self.name}: the IOC did not open {expected}: {status}: {message}")
        with self._lock:
            self._file_path = expected
            self._resource_uids = {}
            self._resource_announced = False
            self._last_frame = None
            self._announced_until = 0
            self._datum_count = 0
        self.last_file_path = expected

    def unstage(self) -> list[Any]:
        with self._lock:
            was_open, self._file_path = self._file_path is not None, None
            self._fly_frames = None
            self._fly_request = None
        if was_open:
            if self.hdf.capture.connected:
                put_and_wait(self.hdf.capture, 0, timeout_s=WRITE_TIMEOUT_S)
            else:
                # Unstaging is clean-up, often after the very failure that took the IOC away:
                # raising here would hide that failure. The file ends where the IOC stopped.
                logger.warning("%s: IOC unreachable; %s was not closed by Capture=0", self.name, self.last_file_path)
        return super().unstage()

    # -- step acquisition ----------------------------------------------------------------------
    def trigger(self) -> DeviceStatus:
        """Acquire one frame; the status finishes when the IOC has written it to the file.

        Raises
        ------
        RuntimeError
            Not staged, or an exposure is in progress.
        """
        with self._lock:
            if self._file_path is None:
                raise RuntimeError(f"{self.name}: stage() the detector before trigger() (no file is open)")
            if self._acquiring:
                raise RuntimeError(f"{self.name}: trigger() while an exposure is in progress")
            self._acquiring = True
        try:
            ensure_connected([self.cam.acquire, self.hdf.num_captured], self.name)
            before = int(self.hdf.num_captured.get(use_monitor=False))
            status = DeviceStatus(self, timeout=self._timeout_s())
        except BaseException:
            with self._lock:
                self._acquiring = False
            raise

        def acquired(*args: Any, **kwargs: Any) -> None:
            # Runs on ophyd's dispatcher thread: check the outcome on another thread.
            threading.Thread(target=self._confirm_frames, args=(status, before, 1), daemon=True).start()

        self.cam.acquire.put(1, use_complete=True, callback=acquired, timeout=self._timeout_s())
        return status

    def _confirm_frames(self, status: DeviceStatus, before: int, frames: int) -> None:
        try:
            captured = int(self.hdf.num_captured.get(use_monitor=False))
            state = self.cam.detector_state.get(use_monitor=False)
            if state == "Error" or captured < before + frames:
                message = self.cam.status_message.get(use_monitor=False)
                write = self.hdf.write_message.get(use_monitor=False)
                raise RuntimeError(
                    f"{self.name}: {captured - before} of {frames} frame(s) written (state {state}: {message}; file: {write})"
                )
        except Exception as exc:  # the status carries any failure (including a disconnect) to the plan
            with self._lock:
                self._acquiring = False
            status.set_exception(exc)
            return
        with self._lock:
            self._acquiring = False
            self._last_frame = captured - 1
        status.set_finished()

    def get_index(self) -> int:
        """Frames in the current file (0 when not staged)."""
        with self._lock:
            if self._file_path is None:
                return 0
        return int(self.hdf.num_captured.get())

    # -- fly acquisition -------------------------------------------------------------------------
    def kickoff(self) -> Status:
        """Start the prepared frames, or arm them when a start position was prepared.

        Armed, the acquisition starts when the start axis's readback passes the start position
        (a software position-compare: the latency is that of the readback monitor; the IOC
        records each frame's own angle, which is what the data use). The returned status
        finishes when the acquisition runs (or is armed); ``complete()`` when the frames are in.
        """
        with self._lock:
            frames = self._fly_frames
            if frames is None or self._file_path is None:
                raise RuntimeError(f"{self.name}: prepare({{'num_frames': n, 'period_s': p}}) and stage() before kickoff()")
            self._acquiring = True
        start_at = self._fly_start
        before = int(self.hdf.num_captured.get(use_monitor=False))
        fly_status = self._fly_status = DeviceStatus(self, timeout=self._timeout_s(frames) + (_ARM_TIMEOUT_S if start_at else 0.0))

        def acquired(*args: Any, **kwargs: Any) -> None:
            threading.Thread(target=self._confirm_frames, args=(fly_status, before, frames), daemon=True).start()

        def start_acquisition() -> None:
            self.cam.acquire.put(1, use_complete=True, callback=acquired, timeout=self._timeout_s(frames))

        if start_at is None:
            started = SubscriptionStatus(
                self.cam.acquire_rbv, lambda value=None, **kwargs: value == 1, timeout=WRITE_TIMEOUT_S, run=False
            )
            start_acquisition()
            return started
        motor, position = start_at
        sign = 1.0 if float(motor.position) <= position else -1.0
        fired = threading.Event()

        def on_readback(value: Any = None, **kwargs: Any) -> None:
            if value is None or fired.is_set() or sign * (float(value) - position) < 0:
                return
            fired.set()
            # Not on the monitor's callback thread: a put waits on Channel Access.
            threading.Thread(target=start_acquisition, daemon=True).start()

        token = motor.subscribe(on_readback, event_type=motor.SUB_READBACK, run=True)
        fly_status.add_callback(lambda status: motor.unsubscribe(token))
        armed = Status(self, timeout=WRITE_TIMEOUT_S)
        armed.set_finished()
        return armed

    def complete(self) -> DeviceStatus:
        """The status of the running fly acquisition: finished when every frame is in the file."""
        status = getattr(self, "_fly_status", None)
        if status is None:
            raise RuntimeError(f"{self.name}: kickoff() before complete()")
        return status

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        """Data keys of a fly scan: the image and the per-frame NDAttributes (all external)."""
        rows, cols = self.frame_shape_px
        return {self.image_data_key: self._image_key_description(rows, cols), **self._attribute_descriptions(fly=True)}

    def _announced_attributes(self, *, fly: bool) -> dict[str, tuple[str, str]]:
        return announced_attributes(self.frame_attribute_keys, self.step_attribute_suffixes, fly=fly)

    def _attribute_descriptions(self, *, fly: bool) -> dict[str, dict[str, Any]]:
        return attribute_descriptions(self.name, self._announced_attributes(fly=fly), source_prefix=f"PV:{self.hdf.prefix}NDAttributes:")

    # -- documents -------------------------------------------------------------------------------
    def _image_key_description(self, rows: int, cols: int) -> dict[str, Any]:
        return {
            "source": f"PV:{self.prefix}HDF1:FullFileName_RBV",
            "dtype": "array",
            "dtype_numpy": self.frame_dtype.str,
            "shape": [rows, cols],
            "dims": ["row", "column"],
            "external": "STREAM:",
        }

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        rows, cols = self.frame_shape_px
        description[self.image_data_key] = self._image_key_description(rows, cols)
        # The frame's own NDAttributes, as the IOC wrote them with it (not a read after the exposure).
        description.update(self._attribute_descriptions(fly=False))
        return description

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, StreamResource | StreamDatum]]:
        """Yield the file's stream resource(s) once, then a datum for the frames to announce.

        Step scans announce the frame of the latest trigger; fly scans (after ``kickoff``)
        announce all frames written since the last call, up to ``index``.
        """
        with self._lock:
            path, fly = self._file_path, self._fly_frames is not None
        if path is None:
            return
        rows, cols = self.frame_shape_px
        written = int(self.hdf.num_captured.get()) if fly else 0
        with self._lock:
            if fly:
                stop = written if index is None else min(int(index), written)
                start = self._announced_until
            elif self._last_frame is None or self._last_frame < self._announced_until:
                start = stop = self._announced_until
            else:
                start, stop = self._last_frame, self._last_frame + 1
            announce_resources = not self._resource_announced
            if announce_resources:
                self._resource_announced = True
                self._resource_uids = {self.image_data_key: str(uuid4())}
                for suffix in self._announced_attributes(fly=fly):
                    self._resource_uids[f"{self.name}_{suffix}"] = str(uuid4())
            resource_uids = dict(self._resource_uids)
            datum_number = self._datum_count
            if stop > start:
                self._announced_until = stop
                self._datum_count += 1
        datasets = {self.image_data_key: DATASET_PATH}
        chunks = {self.image_data_key: [1, rows, cols]}
        for suffix, (attribute, _units) in self.frame_attribute_keys.items():
            datasets[f"{self.name}_{suffix}"] = f"{ATTRIBUTES_PATH}/{attribute}"
            chunks[f"{self.name}_{suffix}"] = [256]
        if stop > start:
            # The plugin flushes on a timer; readers told about these frames must see them now.
            self.hdf.flush_now.set(1).wait(timeout=WRITE_TIMEOUT_S)
            if self.hdf.write_status.get(use_monitor=False) != "Write OK":
                # No reader may be told about frames the file does not hold.
                raise RuntimeError(f"{self.name}: {self.hdf.write_message.get(use_monitor=False)}")
        yield from stream_asset_docs(
            path=path,
            resource_uids=resource_uids,
            datasets=datasets,
            chunk_shapes=chunks,
            announce_resources=announce_resources,
            start=start,
            stop=stop,
            datum_number=datum_number,
        )


class EpicsXrayDetector(EpicsAreaDetector):
    """The tomography camera over EPICS (uint16 frames), interface of :class:`~corrflow.devices.detectors.XrayDetector`.

    Notes
    -----
    Components beyond :class:`EpicsAreaDetector`: ``image_key`` (normal, soft: NXtomo 0
    projection, 1 flat, 2 dark, set by plans per stream), ``pixel_size_um`` (config, um at the
    sample), ``energy_keV`` (config, keV), ``distance_mm`` (config, mm) from ``optics:``.
    """

    # The simulated camera's attributes, and the ring current the IOC reads for each exposure (the
    # in-process simulation has no source: its flux is constant).
    frame_attribute_keys = {**XrayDetector.frame_attribute_keys, "ring_current": ("RingCurrent", "mA")}
    step_attribute_suffixes = (*XrayDetector.step_attribute_suffixes, "ring_current")

    image_key = Cpt(ConfigSignal, value=IMAGE_KEY_PROJECTION, kind="normal", check=_check_image_key)
    pixel_size_um = Readback("optics:PixelSize_RBV", kind="config")
    energy_keV = Readback("optics:Energy_RBV", kind="config")
    distance_mm = Readback("optics:Distance_RBV", kind="config")


class EpicsMicroscopeDetector(EpicsAreaDetector):
    """The electron microscope detector over EPICS (float32 frames).

    Notes
    -----
    Components beyond :class:`EpicsAreaDetector`: ``pixel_size_um`` (config, um in the
    ``microscope_stage`` frame).
    """

    frame_attribute_keys = MicroscopeDetector.frame_attribute_keys  # one definition, shared with the simulated one

    pixel_size_um = Readback("optics:PixelSize_RBV", kind="config")
