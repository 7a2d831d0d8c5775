"""Preflight: read the instrument through the RunEngine, then check a request against what it read.

A plan's first messages are the reads of :func:`read_tomo_state` / :func:`read_microscope_state`
(``bps.rd``: ``read``/``locate`` messages, no motion). The checks of :func:`check_tomo_scan`,
:func:`check_tomo_fly_scan` and :func:`check_micrograph` are pure functions of the request and that
state, so a plan that fails them raises :class:`~corrflow.plans.requests.PlanValidationError`
before any motor moves or file is written, and it checks the instrument as it is when the plan runs
(a queued experiment is checked when its turn comes, not when it was submitted).

Outside a RunEngine (estimates, ``summarize_messages``) :func:`read_now` answers the same reads
from the devices directly.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import Msg, MsgGenerator

from corrflow.plans.requests import MicrographRequest, TomoFlyScanRequest, TomoScanRequest

__all__ = [
    "DISK_RESERVE_BYTES",
    "MIN_HALF_ACQUISITION_OVERLAP_PX",
    "AxisState",
    "DetectorState",
    "MicroscopeState",
    "TomoState",
    "check_micrograph",
    "check_tomo_fly_scan",
    "check_tomo_scan",
    "free_bytes",
    "read_microscope_state",
    "read_now",
    "read_tomo_state",
]

DISK_RESERVE_BYTES = 100 * 2**20
"""Free space a plan must leave on the detector's file system (bytes)."""
MIN_HALF_ACQUISITION_OVERLAP_PX = 16
"""Detector columns both half turns of an offset-centre scan must share (nominally, with the axis at the
detector centre at the current stage x): the reconstruction blends the halves over them and finds the
true axis by correlating them, and the real axis may sit a few pixels from the nominal one."""


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent), and that parent."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free, where


@dataclass(frozen=True)
class AxisState:
    """One axis as read: position, soft limits and velocity (in the axis' unit)."""

    position: float
    low: float
    high: float
    velocity: float

    def within(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class DetectorState:
    """A detector as read: frame geometry, pixel size and the room left for its files."""

    frame_shape_px: tuple[int, int]
    frame_itemsize_bytes: int
    pixel_size_um: float
    exposure_s: float
    free_bytes: int
    data_dir: Path

    @property
    def field_width_um(self) -> float:
        return self.frame_shape_px[1] * self.pixel_size_um

    def frame_bytes(self, n_frames: int) -> int:
        rows, cols = self.frame_shape_px
        return n_frames * rows * cols * self.frame_itemsize_bytes


@dataclass(frozen=True)
class TomoState:
    """The beamline as a tomography scan needs it: stage axes, detector and beam geometry, shutter."""

    x: AxisState
    rotation: AxisState
    y_um: float
    z_um: float
    detector: DetectorState
    energy_keV: float
    distance_mm: float
    shutter_actuation_s: float


@dataclass(frozen=True)
class MicroscopeState:
    """The microscope as a micrograph needs it."""

    x: AxisState
    y: AxisState
    detector: DetectorState


def read_axis(axis: Any) -> MsgGenerator[AxisState]:
    """Plan stub: an axis' position, soft limits and velocity (reads only)."""
    position = yield from bps.rd(axis)
    low = yield from bps.rd(axis.low_limit_travel)
    high = yield from bps.rd(axis.high_limit_travel)
    velocity = yield from bps.rd(axis.velocity)
    return AxisState(position=float(position), low=float(low), high=float(high), velocity=float(velocity))


def _read_detector(detector: Any) -> MsgGenerator[DetectorState]:
    # An EPICS detector's frame geometry is the IOC's (ArraySize, DataType); a simulated one's is fixed.
    signals = getattr(detector, "frame_geometry_signals", None)
    if signals is not None:
        rows = yield from bps.rd(signals["rows"])
        cols = yield from bps.rd(signals["cols"])
        data_type = yield from bps.rd(signals["data_type"])
        shape, itemsize = (int(rows), int(cols)), detector.itemsize_of_data_type(data_type)
    else:
        shape, itemsize = tuple(detector.frame_shape_px), np.dtype(detector.frame_dtype).itemsize
    pixel_size_um = yield from bps.rd(detector.pixel_size_um)
    exposure_s = yield from bps.rd(detector.exposure_s)
    free, where = free_bytes(detector.data_dir)
    return DetectorState(
        frame_shape_px=shape,  # type: ignore[arg-type]
        frame_itemsize_bytes=int(itemsize),
        pixel_size_um=float(pixel_size_um),
        exposure_s=float(exposure_s),
        free_bytes=free,
        data_dir=where,
    )


def read_tomo_state(devices: Any) -> MsgGenerator[TomoState]:
    """Plan stub: read what a tomography scan is checked against (reads only)."""
    stage, detector = devices.stage, devices.detector
    x = yield from read_axis(stage.x)
    rotation = yield from read_axis(stage.rotation)
    y_um = yield from bps.rd(stage.y)
    z_um = yield from bps.rd(stage.z)
    detector_state = yield from _read_detector(detector)
    energy = yield from bps.rd(detector.energy_keV)
    distance = yield from bps.rd(detector.distance_mm)
    actuation = yield from bps.rd(devices.shutter.actuation_time_s)
    return TomoState(
        x=x,
        rotation=rotation,
        y_um=float(y_um),
        z_um=float(z_um),
        detector=detector_state,
        energy_keV=float(energy),
        distance_mm=float(distance),
        shutter_actuation_s=float(actuation),
    )


def read_microscope_state(microscope: Any) -> MsgGenerator[MicroscopeState]:
    """Plan stub: read what a micrograph is checked against (reads only)."""
    x = yield from read_axis(microscope.stage.x)
    y = yield from read_axis(microscope.stage.y)
    detector = yield from _read_detector(microscope.detector)
    return MicroscopeState(x=x, y=y, detector=detector)


READ_COMMANDS = frozenset({"read", "locate"})


def answer_read(msg: Msg) -> Any:
    """What a RunEngine would reply to a ``read`` or ``locate`` message: the device's answer now."""
    return msg.obj.read() if msg.command == "read" else msg.obj.locate()


def read_now(plan: Generator[Msg, Any, Any]) -> Any:
    """Run a read-only plan stub without a RunEngine, answering its reads from the devices.

    Only ``read`` and ``locate`` are answered; any other message is a programming error here.
    """
    reply: Any = None
    try:
        while True:
            msg = plan.send(reply)
            if msg.command not in READ_COMMANDS:
                raise RuntimeError(f"read_now: a preflight read yielded {msg.command!r}, not a read")
            reply = answer_read(msg)
    except StopIteration as stop:
        return stop.value


def check_tomo_scan(request: TomoScanRequest, state: TomoState) -> list[str]:
    """Problems of ``request`` on the beamline in ``state`` (empty when it can run).

    Every projection angle within the rotation's soft limits; the flat-field excursion clears the
    field of view (offset centre: the widened one) and stays within the x limits; an offset centre
    keeps x within its limits and leaves at least :data:`MIN_HALF_ACQUISITION_OVERLAP_PX` columns
    seen by both half turns; the frames fit on the detector's file system with
    :data:`DISK_RESERVE_BYTES` to spare.
    """
    problems: list[str] = []
    detector = state.detector
    field_width_um = detector.field_width_um
    first, last = request.start_deg, request.start_deg + request.angle_step_deg * (request.num_projections - 1)
    if first < state.rotation.low or last > state.rotation.high:
        problems.append(
            f"projection angles [{first}, {last}] deg exceed the rotation limits [{state.rotation.low}, {state.rotation.high}] deg"
        )
    x0, axis_offset = state.x.position, request.axis_offset_um
    flat_offset = resolved_flat_offset_um(request, state)
    if axis_offset:
        cols = detector.frame_shape_px[1]
        overlap_px = cols - 2.0 * abs(axis_offset) / detector.pixel_size_um
        if overlap_px < MIN_HALF_ACQUISITION_OVERLAP_PX:
            largest_um = (cols - MIN_HALF_ACQUISITION_OVERLAP_PX) / 2.0 * detector.pixel_size_um
            problems.append(
                f"axis_offset_um ({axis_offset}) leaves {overlap_px:.1f} px seen by both half turns; at least "
                f"{MIN_HALF_ACQUISITION_OVERLAP_PX} px are needed: |axis_offset_um| <= {largest_um:g} um"
            )
        if not state.x.within(x0 + axis_offset):
            problems.append(
                f"axis_offset_um ({axis_offset}) moves x from {x0} to {x0 + axis_offset} um, outside its limits "
                f"[{state.x.low}, {state.x.high}] um"
            )
        if abs(flat_offset) < field_width_um + abs(axis_offset):
            problems.append(
                f"flat_offset_x_um ({flat_offset}) must move the widened sample out of the field of view: "
                f"|offset| >= detector width + |axis_offset_um| = {field_width_um + abs(axis_offset)} um"
            )
    if abs(flat_offset) < field_width_um:
        problems.append(
            f"flat_offset_x_um ({flat_offset}) must move the sample out of the field of view: "
            f"|offset| >= the detector width {field_width_um} um"
        )
    if not state.x.within(x0 + flat_offset):
        problems.append(
            f"flat_offset_x_um ({flat_offset}) moves x from {x0} to {x0 + flat_offset} um, outside its limits "
            f"[{state.x.low}, {state.x.high}] um"
        )
    problems += disk_problems(detector, request.n_frames)
    return problems


def resolved_flat_offset_um(request: TomoScanRequest, state: TomoState) -> float:
    """``flat_offset_x_um``, or its default of 1.5 detector widths."""
    if request.flat_offset_x_um is not None:
        return request.flat_offset_x_um
    return 1.5 * state.detector.field_width_um


def check_tomo_fly_scan(request: TomoFlyScanRequest, state: TomoState) -> list[str]:
    """The step-scan problems, then the continuous rotation's: its speed must not exceed the axis'
    velocity, and the whole path, run-up included, must stay within the rotation's soft limits."""
    problems = check_tomo_scan(request, state)
    velocity, nominal = request.velocity_deg_per_s, state.rotation.velocity
    if velocity > nominal:
        problems.append(
            f"the rotation would turn at {velocity:.4g} deg/s, above its velocity {nominal:.4g} deg/s: "
            f"lengthen exposure_s or readout_s, or take fewer projections"
        )
    run_up = request.run_up_or_default_deg
    first, last = request.start_deg - run_up, request.stop_deg + run_up
    if first < state.rotation.low or last > state.rotation.high:
        problems.append(
            f"the fly path [{first}, {last}] deg (with run-up) exceeds the rotation limits "
            f"[{state.rotation.low}, {state.rotation.high}] deg"
        )
    return problems


def check_micrograph(request: MicrographRequest, state: MicroscopeState) -> list[str]:
    """Problems of ``request`` on the microscope in ``state``: the target within the stage limits."""
    problems = []
    for name, value, axis in (("stage_x_um", request.stage_x_um, state.x), ("stage_y_um", request.stage_y_um, state.y)):
        if not axis.within(value):
            problems.append(f"{name} ({value}) is outside the stage limits [{axis.low}, {axis.high}] um")
    return problems + disk_problems(state.detector, 1)


def disk_problems(detector: DetectorState, n_frames: int) -> list[str]:
    """The problem of ``n_frames`` more frames on the detector's file system, if they do not fit."""
    needed = detector.frame_bytes(n_frames)
    if needed + DISK_RESERVE_BYTES > detector.free_bytes:
        return [
            f"the detector data ({needed} bytes for {n_frames} frames) does not fit in the "
            f"{detector.free_bytes} bytes free at {detector.data_dir} (keeping {DISK_RESERVE_BYTES} bytes in reserve)"
        ]
    return []
