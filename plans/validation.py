"""Validation, estimates and dry-run summaries of plans, before any device moves.

Every plan function validates its arguments when it is *called* and raises
:class:`PlanValidationError` (a ``ValueError``) listing every problem, before a message is
yielded: a bad request is refused before a motor moves or a file is written. The same checks
back :func:`estimate_tomo_scan` (duration and data volume of a scan) and ``corrflow dry-run``
(:func:`summarize_messages` walks a plan without a RunEngine or hardware).
"""

from __future__ import annotations

import math
import numbers
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.utils import Msg
from pydantic import ValidationError

from corrflow.devices.beamline import Beamline
from corrflow.devices.detectors import XrayDetector
from corrflow.devices.epics_detector import EpicsMicroscopeDetector, EpicsXrayDetector
from corrflow.devices.epics_heater import EpicsHeater
from corrflow.devices.epics_source import BeamMonitor, EpicsShutter
from corrflow.devices.epics_stage import EpicsMicroscopeStage, EpicsSampleStage
from corrflow.devices.heater import Heater
from corrflow.devices.kinds import HEATER_TYPES, SAMPLE_STAGE_TYPES, SHUTTER_TYPES, XRAY_DETECTOR_TYPES
from corrflow.devices.microscope import MicroscopeDetector
from corrflow.devices.sem import Microscope
from corrflow.devices.shutter import Shutter
from corrflow.devices.stage import MicroscopeStage, SampleStage
from corrflow.plans.metadata import RESERVED_KEYS, SampleInfo

__all__ = [
    "MAX_EXPOSURE_S",
    "MAX_PROJECTIONS",
    "MIN_HALF_ACQUISITION_OVERLAP_PX",
    "ROTATION_RANGES_DEG",
    "MicrographRequest",
    "PlanEstimate",
    "PlanValidationError",
    "TomoDevices",
    "TomoFlyScanRequest",
    "TomoScanRequest",
    "estimate_micrograph",
    "estimate_tomo_fly_scan",
    "estimate_tomo_scan",
    "summarize_messages",
    "tomo_devices",
    "validate_micrograph",
    "validate_tomo_fly_scan",
    "validate_tomo_scan",
]

MAX_EXPOSURE_S = 3600.0
MAX_PROJECTIONS = 100_000
MAX_REFERENCE_FRAMES = 10_000
DISK_RESERVE_BYTES = 100 * 2**20
"""Free space a plan must leave on the detector's file system (bytes)."""
ROTATION_RANGES_DEG = (180.0, 360.0)
"""The rotation ranges ``rotation_range_deg`` names: a half turn (parallel beam: complete) or a full turn."""
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


class PlanValidationError(ValueError):
    """Plan arguments are wrong; ``problems`` lists each one, naming the argument."""

    def __init__(self, plan_name: str, problems: Sequence[str]) -> None:
        self.plan_name = plan_name
        self.problems = tuple(problems)
        super().__init__(f"{plan_name}: invalid arguments:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class PlanEstimate:
    """What a plan will cost.

    Attributes
    ----------
    duration_s
        Expected duration on the instrument (s, instrument time, not simulated wall time).
    data_bytes
        Raw detector data written (bytes).
    n_frames
        Detector frames taken.
    """

    duration_s: float
    data_bytes: int
    n_frames: int


@dataclass(frozen=True)
class TomoDevices:
    """The devices of a tomography scan and the identity of the instrument they belong to.

    With a ``heater``, its temperature is read with every frame (in-situ provenance).
    """

    stage: SampleStage | EpicsSampleStage
    detector: XrayDetector | EpicsXrayDetector
    shutter: Shutter | EpicsShutter
    heater: Heater | EpicsHeater | None = None
    instrument: str = "tomography"
    facility: str = "unknown"
    frame: str = "beamline_sample"
    beam: BeamMonitor | None = None


class _Checks:
    """Collects problems so a caller sees all of them at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def integer(self, name: str, value: Any, *, minimum: int, maximum: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            self.fail(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
            return None
        if not minimum <= value <= maximum:
            self.fail(f"{name} must be within [{minimum}, {maximum}], got {value}")
            return None
        return int(value)

    def number(
        self,
        name: str,
        value: Any,
        *,
        unit: str,
        gt: float | None = None,
        le: float | None = None,
        nonzero: bool = False,
    ) -> float | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self.fail(f"{name} must be a number in {unit}, got {value!r} ({type(value).__name__})")
            return None
        value = float(value)
        if not math.isfinite(value):
            self.fail(f"{name} must be finite, got {value}")
            return None
        if gt is not None and not value > gt:
            self.fail(f"{name} must be > {gt} {unit}, got {value}")
            return None
        if le is not None and not value <= le:
            self.fail(f"{name} must be <= {le} {unit}, got {value}")
            return None
        if nonzero and value == 0:
            self.fail(f"{name} must not be 0")
            return None
        return value

    def sample(self, value: Any) -> SampleInfo | None:
        if isinstance(value, SampleInfo):
            return value
        if not isinstance(value, Mapping):
            self.fail(f"sample must be a SampleInfo or a mapping of its fields, got {type(value).__name__}")
            return None
        try:
            return SampleInfo.model_validate(dict(value))
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"])
                self.fail(f"sample.{field}: {error['msg']} (got {error.get('input')!r})")
            return None

    def metadata(self, md: Any) -> dict[str, Any]:
        if md is None:
            return {}
        if not isinstance(md, Mapping):
            self.fail(f"md must be a mapping, got {type(md).__name__}")
            return {}
        bad_keys = [key for key in md if not isinstance(key, str)]
        if bad_keys:
            self.fail(f"md keys must be strings, got {bad_keys!r}")
        clashes = sorted(set(md) & RESERVED_KEYS)
        if clashes:
            self.fail(f"md: keys {clashes} are set by the plan and cannot be given in md")
        return dict(md)

    def uids(self, name: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, Sequence):
            self.fail(f"{name} must be a sequence of uid strings, got {value!r}")
            return ()
        bad = [uid for uid in value if not isinstance(uid, str) or not uid]
        if bad:
            self.fail(f"{name} must hold non-empty strings, got {bad!r}")
        return tuple(str(uid) for uid in value)

    def disk_space(self, detector: Any, *, n_frames: int) -> None:
        """Fail unless the detector's data directory has room for ``n_frames`` frames (and a margin)."""
        rows, cols = detector.frame_shape_px
        needed = n_frames * rows * cols * np.dtype(detector.frame_dtype).itemsize
        free, where = free_bytes(detector.data_dir)
        if needed + DISK_RESERVE_BYTES > free:
            self.fail(
                f"the detector data ({needed} bytes for {n_frames} frames) does not fit in the "
                f"{free} bytes free at {where} (keeping {DISK_RESERVE_BYTES} bytes in reserve)"
            )

    def raise_if_any(self, plan_name: str) -> None:
        if self.problems:
            raise PlanValidationError(plan_name, self.problems)


def tomo_devices(beamline: Any) -> TomoDevices:
    """The tomography devices of a ``Beamline`` (or a ``(stage, detector, shutter)`` tuple).

    Raises
    ------
    PlanValidationError
        The argument does not hold a ``SampleStage``, an ``XrayDetector`` and a ``Shutter``.
    """
    if isinstance(beamline, TomoDevices):
        devices = beamline
    elif isinstance(beamline, Beamline):
        devices = TomoDevices(
            stage=beamline.stage,
            detector=beamline.detector,
            shutter=beamline.shutter,
            heater=beamline.heater,
            instrument=beamline.name,
            facility=beamline.facility,
            frame=beamline.frame,
            beam=beamline.beam,
        )
    elif isinstance(beamline, tuple) and len(beamline) == 3:
        devices = TomoDevices(*beamline)
    else:
        raise PlanValidationError(
            "tomo_scan", [f"beamline must be a Beamline or a (stage, detector, shutter) tuple, got {beamline!r}"]
        )
    problems = []
    for attr, kinds in (("stage", SAMPLE_STAGE_TYPES), ("detector", XRAY_DETECTOR_TYPES), ("shutter", SHUTTER_TYPES)):
        if not isinstance(getattr(devices, attr), kinds):
            names = " or ".join(kind.__name__ for kind in kinds)
            problems.append(f"beamline {attr} must be a {names}, got {type(getattr(devices, attr)).__name__}")
    if devices.heater is not None and not isinstance(devices.heater, HEATER_TYPES):
        problems.append(f"beamline heater must be a Heater, an EpicsHeater or None, got {type(devices.heater).__name__}")
    if problems:
        raise PlanValidationError("tomo_scan", problems)
    return devices


@dataclass(frozen=True)
class TomoScanRequest:
    """Validated arguments of ``tomo_scan`` and the instrument state they were checked against."""

    devices: TomoDevices
    num_projections: int
    start_deg: float
    stop_deg: float
    exposure_s: float
    num_darks: int
    num_flats: int
    flat_offset_x_um: float
    sample: SampleInfo
    parent_uids: tuple[str, ...]
    md: dict[str, Any]
    initial_x_um: float
    initial_rotation_deg: float
    axis_offset_um: float = 0.0

    @property
    def rotation_range_deg(self) -> float:
        """``stop_deg - start_deg`` (deg)."""
        return self.stop_deg - self.start_deg

    @property
    def half_acquisition(self) -> bool:
        """Offset centre: the projections are taken with the stage x at ``initial_x_um + axis_offset_um``."""
        return self.axis_offset_um != 0.0

    @property
    def projection_x_um(self) -> float:
        """Stage x during the projections (um)."""
        return self.initial_x_um + self.axis_offset_um

    @property
    def nominal_overlap_px(self) -> float:
        """Detector columns both half turns see, if the axis is at the detector centre at ``initial_x_um``."""
        cols = self.devices.detector.frame_shape_px[1]
        return cols - 2.0 * abs(self.axis_offset_um) / float(self.devices.detector.pixel_size_um.get())

    @property
    def angles_deg(self) -> tuple[float, ...]:
        """Projection angles over ``[start_deg, stop_deg)``, equally spaced (deg)."""
        step = (self.stop_deg - self.start_deg) / self.num_projections
        return tuple(self.start_deg + k * step for k in range(self.num_projections))

    @property
    def n_frames(self) -> int:
        return self.num_darks + self.num_flats + self.num_projections


def validate_tomo_scan(
    beamline: Any,
    *,
    num_projections: Any,
    exposure_s: Any,
    sample: Any,
    start_deg: Any = 0.0,
    stop_deg: Any = None,
    rotation_range_deg: Any = None,
    axis_offset_um: Any = 0.0,
    num_darks: Any = 10,
    num_flats: Any = 10,
    flat_offset_x_um: Any = None,
    parent_uids: Any = (),
    md: Any = None,
) -> TomoScanRequest:
    """Check every argument of ``tomo_scan`` against types, units and the instrument's limits.

    The checks: ``num_projections`` an integer >= 2; ``exposure_s`` in (0, 3600] s; ``stop_deg``
    (default ``start_deg + rotation_range_deg``, and ``rotation_range_deg`` default 180) > ``start_deg``,
    at most one turn apart, every projection angle within the rotation's soft limits;
    ``rotation_range_deg`` 180 or 360 and, if ``stop_deg`` is given too, equal to ``stop_deg - start_deg``;
    ``num_darks``, ``num_flats`` integers >= 1; ``flat_offset_x_um`` (default: 1.5 x the detector width)
    moves the sample out of the field of view (at least one detector width) and stays within the x soft
    limits; ``sample`` a valid :class:`SampleInfo`; ``md`` a mapping without plan-owned keys.

    A non-zero ``axis_offset_um`` (offset centre, half acquisition) also needs: a full turn
    (``stop_deg - start_deg == 360``); ``x + axis_offset_um`` within the x soft limits; a nominal overlap
    ``cols - 2 |axis_offset_um| / pixel_size_um`` of at least :data:`MIN_HALF_ACQUISITION_OVERLAP_PX`
    columns; and flats that clear the widened field, ``|flat_offset_x_um| >= detector width +
    |axis_offset_um|``.

    Raises
    ------
    PlanValidationError
        Listing every problem found.
    """
    devices = tomo_devices(beamline)
    checks = _Checks()
    stage, detector = devices.stage, devices.detector
    n_proj = checks.integer("num_projections", num_projections, minimum=2, maximum=MAX_PROJECTIONS)
    exposure = checks.number("exposure_s", exposure_s, unit="s", gt=0.0, le=MAX_EXPOSURE_S)
    start = checks.number("start_deg", start_deg, unit="deg")
    span = None
    if rotation_range_deg is not None:
        span = checks.number("rotation_range_deg", rotation_range_deg, unit="deg")
        if span is not None and span not in ROTATION_RANGES_DEG:
            checks.fail(f"rotation_range_deg must be 180 or 360 deg, got {span}")
            span = None
    if stop_deg is None:
        stop = None if start is None else start + (span if span is not None else ROTATION_RANGES_DEG[0])
    else:
        stop = checks.number("stop_deg", stop_deg, unit="deg")
        if span is not None and start is not None and stop is not None and not math.isclose(stop - start, span):
            checks.fail(
                f"stop_deg - start_deg ({stop - start}) disagrees with rotation_range_deg ({span}): give one of them"
            )
    axis_offset = checks.number("axis_offset_um", axis_offset_um, unit="um")
    darks = checks.integer("num_darks", num_darks, minimum=1, maximum=MAX_REFERENCE_FRAMES)
    flats = checks.integer("num_flats", num_flats, minimum=1, maximum=MAX_REFERENCE_FRAMES)
    rows, cols = detector.frame_shape_px
    field_width_um = cols * float(detector.pixel_size_um.get())
    if flat_offset_x_um is None:
        flat_offset_x_um = 1.5 * field_width_um
    offset = checks.number("flat_offset_x_um", flat_offset_x_um, unit="um", nonzero=True)
    info = checks.sample(sample)
    uids = checks.uids("parent_uids", parent_uids)
    user_md = checks.metadata(md)

    if start is not None and stop is not None:
        if not stop > start:
            checks.fail(f"stop_deg ({stop}) must be greater than start_deg ({start})")
        elif stop - start > 360.0:
            checks.fail(f"stop_deg - start_deg must be at most 360 deg, got {stop - start}")
        elif n_proj is not None:
            last = start + (stop - start) * (n_proj - 1) / n_proj
            low, high = stage.rotation.limits
            if start < low or last > high:
                checks.fail(
                    f"projection angles [{start}, {last}] deg exceed the rotation limits [{low}, {high}] deg"
                )
    x0 = float(stage.x.position)
    if axis_offset:  # offset centre (half acquisition)
        pixel_um = float(detector.pixel_size_um.get())
        if start is not None and stop is not None and not math.isclose(stop - start, 360.0):
            checks.fail(
                f"axis_offset_um ({axis_offset}) (offset centre, half acquisition) needs a full turn: "
                f"rotation_range_deg=360, got stop_deg - start_deg = {stop - start}"
            )
        overlap_px = cols - 2.0 * abs(axis_offset) / pixel_um
        if overlap_px < MIN_HALF_ACQUISITION_OVERLAP_PX:
            largest_um = (cols - MIN_HALF_ACQUISITION_OVERLAP_PX) / 2.0 * pixel_um
            checks.fail(
                f"axis_offset_um ({axis_offset}) leaves {overlap_px:.1f} px seen by both half turns; at least "
                f"{MIN_HALF_ACQUISITION_OVERLAP_PX} px are needed: |axis_offset_um| <= {largest_um:g} um"
            )
        low, high = stage.x.limits
        if not low <= x0 + axis_offset <= high:
            checks.fail(
                f"axis_offset_um ({axis_offset}) moves x from {x0} to {x0 + axis_offset} um, outside its limits "
                f"[{low}, {high}] um"
            )
        if offset is not None and abs(offset) < field_width_um + abs(axis_offset):
            checks.fail(
                f"flat_offset_x_um ({offset}) must move the widened sample out of the field of view: "
                f"|offset| >= detector width + |axis_offset_um| = {field_width_um + abs(axis_offset)} um"
            )
    if offset is not None:
        if abs(offset) < field_width_um:
            checks.fail(
                f"flat_offset_x_um ({offset}) must move the sample out of the field of view: "
                f"|offset| >= the detector width {field_width_um} um"
            )
        low, high = stage.x.limits
        if not low <= x0 + offset <= high:
            checks.fail(
                f"flat_offset_x_um ({offset}) moves x from {x0} to {x0 + offset} um, outside its limits [{low}, {high}] um"
            )
    if n_proj is not None and darks is not None and flats is not None:
        checks.disk_space(detector, n_frames=n_proj + darks + flats)
    checks.raise_if_any("tomo_scan")
    return TomoScanRequest(
        devices=devices,
        num_projections=n_proj,  # type: ignore[arg-type]  # checked above
        start_deg=start,  # type: ignore[arg-type]
        stop_deg=stop,  # type: ignore[arg-type]
        exposure_s=exposure,  # type: ignore[arg-type]
        num_darks=darks,  # type: ignore[arg-type]
        num_flats=flats,  # type: ignore[arg-type]
        flat_offset_x_um=offset,  # type: ignore[arg-type]
        sample=info,  # type: ignore[arg-type]
        parent_uids=uids,
        md=user_md,
        initial_x_um=x0,
        initial_rotation_deg=float(stage.rotation.position),
        axis_offset_um=float(axis_offset or 0.0),
    )


@dataclass(frozen=True)
class TomoFlyScanRequest:
    """Validated arguments of ``tomo_fly_scan``: those of a step scan plus the continuous rotation."""

    tomo: TomoScanRequest
    readout_s: float
    period_s: float
    velocity_deg_per_s: float
    run_up_deg: float
    nominal_velocity_deg_per_s: float

    @property
    def first_deg(self) -> float:
        """Where the rotation starts moving (deg): ``start_deg - run_up_deg``."""
        return self.tomo.start_deg - self.run_up_deg

    @property
    def last_deg(self) -> float:
        """Where the rotation stops (deg): ``stop_deg + run_up_deg``."""
        return self.tomo.stop_deg + self.run_up_deg


def validate_tomo_fly_scan(
    beamline: Any, *, readout_s: Any = 0.001, run_up_deg: Any = None, **kwargs: Any
) -> TomoFlyScanRequest:
    """Check ``tomo_fly_scan``: the step-scan checks, then the continuous rotation.

    The rotation turns at ``(stop_deg - start_deg) / (num_projections * period)`` with
    ``period = exposure_s + readout_s``; that speed must not exceed the axis' current
    (nominal) velocity, and the whole path ``[start_deg - run_up_deg, stop_deg + run_up_deg]``
    must be within the rotation's soft limits. ``run_up_deg`` defaults to two angular steps.

    Raises
    ------
    PlanValidationError
        Listing every problem found.
    """
    tomo = validate_tomo_scan(beamline, **kwargs)
    checks = _Checks()
    readout = checks.number("readout_s", readout_s, unit="s", le=MAX_EXPOSURE_S)
    if readout is not None and readout < 0:
        checks.fail(f"readout_s must be >= 0 s, got {readout}")
    checks.raise_if_any("tomo_fly_scan")
    period_s = tomo.exposure_s + readout  # type: ignore[operator]
    span_deg = tomo.stop_deg - tomo.start_deg
    velocity = span_deg / (tomo.num_projections * period_s)
    step_deg = span_deg / tomo.num_projections
    run_up = 2.0 * step_deg if run_up_deg is None else checks.number("run_up_deg", run_up_deg, unit="deg")
    rotation = tomo.devices.stage.rotation
    nominal = float(rotation.velocity.get())
    if velocity > nominal:
        checks.fail(
            f"the rotation would turn at {velocity:.4g} deg/s, above its velocity {nominal:.4g} deg/s: "
            f"lengthen exposure_s or readout_s, or take fewer projections"
        )
    if run_up is not None:
        if run_up < 0:
            checks.fail(f"run_up_deg must be >= 0 deg, got {run_up}")
        low, high = rotation.limits
        if tomo.start_deg - run_up < low or tomo.stop_deg + run_up > high:
            checks.fail(
                f"the fly path [{tomo.start_deg - run_up}, {tomo.stop_deg + run_up}] deg (with run-up) exceeds "
                f"the rotation limits [{low}, {high}] deg"
            )
    checks.raise_if_any("tomo_fly_scan")
    return TomoFlyScanRequest(
        tomo=tomo,
        readout_s=float(readout),  # type: ignore[arg-type]
        period_s=period_s,
        velocity_deg_per_s=velocity,
        run_up_deg=float(run_up),  # type: ignore[arg-type]
        nominal_velocity_deg_per_s=nominal,
    )


def estimate_tomo_fly_scan(beamline: Any, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of ``tomo_fly_scan(beamline, **kwargs)`` (validates first)."""
    request = validate_tomo_fly_scan(beamline, **kwargs)
    tomo = request.tomo
    step = _estimate_tomo(tomo)
    stage = tomo.devices.stage
    rotation_v, x_v = request.nominal_velocity_deg_per_s, float(stage.x.velocity.get())
    references_s = (tomo.num_darks + tomo.num_flats) * tomo.exposure_s + _x_travel_um(tomo) / x_v
    motion_s = (
        abs(request.first_deg - tomo.initial_rotation_deg) / rotation_v
        + (request.last_deg - request.first_deg) / request.velocity_deg_per_s
        + abs(request.last_deg - tomo.initial_rotation_deg) / rotation_v
    )
    shutter_s = 3 * float(tomo.devices.shutter.actuation_time_s.get())
    return PlanEstimate(duration_s=references_s + motion_s + shutter_s, data_bytes=step.data_bytes, n_frames=step.n_frames)


def estimate_tomo_scan(beamline: Any, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of ``tomo_scan(beamline, **kwargs)`` (validates the arguments first).

    The duration adds the exposures (``num_projections`` of them: a full turn at the angular step of a
    half turn takes twice as many, and twice the time), the rotation sweep, the flat-field excursion and
    the offset-centre move at the axes' velocities, the return to the start and the shutter actuations;
    the detector is taken to read out during the next exposure (no dead time).

    Raises
    ------
    PlanValidationError
        As :func:`validate_tomo_scan`.
    """
    request = validate_tomo_scan(beamline, **kwargs)
    return _estimate_tomo(request)


def _x_travel_um(request: TomoScanRequest) -> float:
    """Stage x path (um): out for the flats, to the projection position (offset centre), back to the start."""
    flat, axis = request.flat_offset_x_um, request.axis_offset_um
    return abs(flat) + abs(flat - axis) + abs(axis)


def _estimate_tomo(request: TomoScanRequest) -> PlanEstimate:
    stage, detector, shutter = request.devices.stage, request.devices.detector, request.devices.shutter
    rotation_v = float(stage.rotation.velocity.get())
    x_v = float(stage.x.velocity.get())
    angles = request.angles_deg
    motion_s = (
        abs(angles[0] - request.initial_rotation_deg) / rotation_v
        + abs(angles[-1] - angles[0]) / rotation_v
        + abs(angles[-1] - request.initial_rotation_deg) / rotation_v
        + _x_travel_um(request) / x_v
    )
    shutter_s = 3 * float(shutter.actuation_time_s.get())  # close, open, close
    duration_s = request.n_frames * request.exposure_s + motion_s + shutter_s
    rows, cols = detector.frame_shape_px
    frame_bytes = rows * cols * detector.frame_dtype.itemsize
    return PlanEstimate(duration_s=duration_s, data_bytes=request.n_frames * frame_bytes, n_frames=request.n_frames)


@dataclass(frozen=True)
class MicrographRequest:
    """Validated arguments of ``micrograph``."""

    stage: MicroscopeStage | EpicsMicroscopeStage
    detector: MicroscopeDetector | EpicsMicroscopeDetector
    instrument: str
    facility: str
    frame: str
    stage_x_um: float
    stage_y_um: float
    exposure_s: float | None
    sample: SampleInfo
    parent_uids: tuple[str, ...]
    md: dict[str, Any]


def validate_micrograph(
    microscope: Any,
    *,
    stage_x_um: Any,
    stage_y_um: Any,
    sample: Any,
    exposure_s: Any = None,
    parent_uids: Any = (),
    md: Any = None,
) -> MicrographRequest:
    """Check the arguments of ``micrograph``: a ``Microscope``, target within the stage limits.

    Raises
    ------
    PlanValidationError
        Listing every problem found.
    """
    if not isinstance(microscope, Microscope):
        raise PlanValidationError("micrograph", [f"microscope must be a Microscope, got {microscope!r}"])
    checks = _Checks()
    x = checks.number("stage_x_um", stage_x_um, unit="um")
    y = checks.number("stage_y_um", stage_y_um, unit="um")
    exposure = None if exposure_s is None else checks.number("exposure_s", exposure_s, unit="s", gt=0.0, le=MAX_EXPOSURE_S)
    for name, value, axis in (("stage_x_um", x, microscope.stage.x), ("stage_y_um", y, microscope.stage.y)):
        if value is not None:
            low, high = axis.limits
            if not low <= value <= high:
                checks.fail(f"{name} ({value}) is outside the stage limits [{low}, {high}] um")
    info = checks.sample(sample)
    uids = checks.uids("parent_uids", parent_uids)
    user_md = checks.metadata(md)
    checks.raise_if_any("micrograph")
    return MicrographRequest(
        stage=microscope.stage,
        detector=microscope.detector,
        instrument=microscope.name,
        facility=microscope.facility,
        frame=microscope.frame,
        stage_x_um=x,  # type: ignore[arg-type]  # checked above
        stage_y_um=y,  # type: ignore[arg-type]
        exposure_s=exposure,
        sample=info,  # type: ignore[arg-type]
        parent_uids=uids,
        md=user_md,
    )


def estimate_micrograph(microscope: Any, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of ``micrograph(microscope, **kwargs)`` (validates first)."""
    request = validate_micrograph(microscope, **kwargs)
    stage, detector = request.stage, request.detector
    travel_s = max(
        abs(request.stage_x_um - stage.x.position) / stage.x.velocity.get(),
        abs(request.stage_y_um - stage.y.position) / stage.y.velocity.get(),
    )
    exposure_s = request.exposure_s if request.exposure_s is not None else float(detector.exposure_s.get())
    rows, cols = detector.frame_shape_px
    return PlanEstimate(
        duration_s=travel_s + exposure_s, data_bytes=rows * cols * detector.frame_dtype.itemsize, n_frames=1
    )


def summarize_messages(plan: Iterable[Msg]) -> dict[str, Any]:
    """Walk a plan without a RunEngine (no device is touched) and count what it would do.

    Parameters
    ----------
    plan
        A plan (generator of ``Msg``), e.g. ``tomo_scan(beamline, ...)``. Messages that expect a
        reply get ``None``, as with ``list(plan)``; plans here read positions with defaults for
        that case.

    Returns
    -------
    dict
        ``{"messages": {command: count}, "events": {stream: count}, "runs": n, "total": n}``:
        messages by command, events per stream (``create`` messages by stream name), runs opened,
        and the total number of messages.
    """
    commands: Counter[str] = Counter()
    events: Counter[str] = Counter()
    for msg in plan:
        commands[msg.command] += 1
        if msg.command == "create":
            events[msg.kwargs.get("name", msg.args[0] if msg.args else "primary")] += 1
    return {
        "messages": dict(commands),
        "events": dict(events),
        "runs": commands.get("open_run", 0),
        "total": sum(commands.values()),
    }
