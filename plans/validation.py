"""Plan setups, estimates and dry-run summaries: what a plan will do, before any device moves.

A plan builds its request model when called (:mod:`corrflow.plans.requests`: pure, no hardware),
then, as its first messages, reads the instrument (:mod:`corrflow.plans.preflight`) and checks the
request against it; :class:`TomoScanSetup` / :class:`TomoFlyScanSetup` / :class:`MicrographSetup`
hold a request together with the state it was checked against. The estimates
(:func:`estimate_tomo_scan`, ...) and :func:`summarize_messages` (``corrflow dry-run``) do the same
outside a RunEngine, answering the reads from the devices (:func:`~corrflow.plans.preflight.read_now`).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
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
from corrflow.plans.metadata import RESERVED_KEYS, Sample
from corrflow.plans.preflight import (
    DISK_RESERVE_BYTES,
    MIN_HALF_ACQUISITION_OVERLAP_PX,
    READ_COMMANDS,
    MicroscopeState,
    TomoState,
    answer_read,
    check_micrograph,
    check_tomo_fly_scan,
    check_tomo_scan,
    free_bytes,
    read_microscope_state,
    read_now,
    read_tomo_state,
    resolved_flat_offset_um,
)
from corrflow.plans.requests import (
    MAX_EXPOSURE_S,
    MAX_PROJECTIONS,
    MAX_REFERENCE_FRAMES,
    MicrographRequest,
    PlanValidationError,
    TomoFlyScanRequest,
    TomoScanRequest,
    problems_of,
)

__all__ = [
    "DISK_RESERVE_BYTES",
    "MAX_EXPOSURE_S",
    "MAX_PROJECTIONS",
    "MAX_REFERENCE_FRAMES",
    "MIN_HALF_ACQUISITION_OVERLAP_PX",
    "MicrographSetup",
    "PlanContext",
    "PlanEstimate",
    "PlanValidationError",
    "TomoDevices",
    "TomoFlyScanSetup",
    "TomoScanSetup",
    "estimate_micrograph",
    "estimate_tomo_fly_scan",
    "estimate_tomo_scan",
    "free_bytes",
    "micrograph_setup",
    "plan_context",
    "request_and_context",
    "summarize_messages",
    "tomo_devices",
    "tomo_fly_scan_setup",
    "tomo_scan_setup",
    "validate_micrograph",
    "validate_tomo_fly_scan",
    "validate_tomo_scan",
]


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


@dataclass(frozen=True)
class PlanContext:
    """What every plan records besides its request: the sample, its parents and the user's metadata."""

    sample: Sample
    parent_uids: tuple[str, ...]
    md: dict[str, Any]


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

    def sample(self, value: Any) -> Sample | None:
        if isinstance(value, Sample):
            return value
        if not isinstance(value, Mapping):
            self.fail(f"sample must be a Sample or a mapping of its fields, got {type(value).__name__}")
            return None
        try:
            return Sample.model_validate(dict(value))
        except ValidationError as exc:
            self.problems.extend(problems_of(exc, prefix="sample."))
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


def plan_context(plan_name: str, *, sample: Any, parent_uids: Any = (), md: Any = None) -> PlanContext:
    """Check the sample, the parent uids and the user's metadata (pure: no hardware)."""
    checks = _Checks()
    info = checks.sample(sample)
    uids = checks.uids("parent_uids", parent_uids)
    user_md = checks.metadata(md)
    checks.raise_if_any(plan_name)
    return PlanContext(sample=info, parent_uids=uids, md=user_md)  # type: ignore[arg-type]  # checked above


class _RecordsContext:
    """The :class:`PlanContext` fields under the names the plan bodies use."""

    context: PlanContext

    @property
    def sample(self) -> Sample:
        return self.context.sample

    @property
    def parent_uids(self) -> tuple[str, ...]:
        return self.context.parent_uids

    @property
    def md(self) -> dict[str, Any]:
        return self.context.md


@dataclass(frozen=True)
class TomoScanSetup(_RecordsContext):
    """A checked tomography request, its devices and the beamline state it was checked against."""

    devices: TomoDevices
    request: TomoScanRequest
    context: PlanContext
    state: TomoState

    # The request's and the state's figures under the names the plan bodies use.
    @property
    def num_projections(self) -> int:
        return self.request.num_projections

    @property
    def start_deg(self) -> float:
        return self.request.start_deg

    @property
    def stop_deg(self) -> float:
        return self.request.stop_deg

    @property
    def rotation_range_deg(self) -> float:
        return self.request.rotation_range_deg

    @property
    def exposure_s(self) -> float:
        return self.request.exposure_s

    @property
    def num_darks(self) -> int:
        return self.request.num_darks

    @property
    def num_flats(self) -> int:
        return self.request.num_flats

    @property
    def axis_offset_um(self) -> float:
        return self.request.axis_offset_um

    @property
    def flat_offset_x_um(self) -> float:
        return resolved_flat_offset_um(self.request, self.state)

    @property
    def angles_deg(self) -> tuple[float, ...]:
        return self.request.angles_deg

    @property
    def n_frames(self) -> int:
        return self.request.n_frames

    @property
    def initial_x_um(self) -> float:
        return self.state.x.position

    @property
    def initial_rotation_deg(self) -> float:
        return self.state.rotation.position

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
        detector = self.state.detector
        return detector.frame_shape_px[1] - 2.0 * abs(self.axis_offset_um) / detector.pixel_size_um


@dataclass(frozen=True)
class TomoFlyScanSetup:
    """A checked fly-scan request: the step-scan setup plus the continuous rotation."""

    tomo: TomoScanSetup

    @property
    def request(self) -> TomoFlyScanRequest:
        return self.tomo.request  # type: ignore[return-value]  # built from a TomoFlyScanRequest

    @property
    def readout_s(self) -> float:
        return self.request.readout_s

    @property
    def period_s(self) -> float:
        return self.request.period_s

    @property
    def velocity_deg_per_s(self) -> float:
        return self.request.velocity_deg_per_s

    @property
    def run_up_deg(self) -> float:
        return self.request.run_up_or_default_deg

    @property
    def nominal_velocity_deg_per_s(self) -> float:
        return self.tomo.state.rotation.velocity

    @property
    def first_deg(self) -> float:
        """Where the rotation starts moving (deg): ``start_deg - run_up_deg``."""
        return self.tomo.start_deg - self.run_up_deg

    @property
    def last_deg(self) -> float:
        """Where the rotation stops (deg): ``stop_deg + run_up_deg``."""
        return self.tomo.stop_deg + self.run_up_deg


@dataclass(frozen=True)
class MicrographSetup(_RecordsContext):
    """A checked micrograph request, the microscope's devices and the state it was checked against."""

    stage: MicroscopeStage | EpicsMicroscopeStage
    detector: MicroscopeDetector | EpicsMicroscopeDetector
    instrument: str
    facility: str
    frame: str
    request: MicrographRequest
    context: PlanContext
    state: MicroscopeState

    @property
    def stage_x_um(self) -> float:
        return self.request.stage_x_um

    @property
    def stage_y_um(self) -> float:
        return self.request.stage_y_um

    @property
    def exposure_s(self) -> float | None:
        return self.request.exposure_s


def tomo_scan_setup(devices: TomoDevices, request: TomoScanRequest, context: PlanContext):
    """Plan stub (preflight): read the beamline, check ``request`` against it, return the setup.

    Raises :class:`PlanValidationError` (inside the RunEngine, before any motion) listing every problem.
    """
    state = yield from read_tomo_state(devices)
    check = check_tomo_fly_scan if isinstance(request, TomoFlyScanRequest) else check_tomo_scan
    problems = check(request, state)  # type: ignore[arg-type]
    if problems:
        raise PlanValidationError(request.plan_name, problems)
    return TomoScanSetup(devices=devices, request=request, context=context, state=state)


def tomo_fly_scan_setup(devices: TomoDevices, request: TomoFlyScanRequest, context: PlanContext):
    """Plan stub (preflight) of a fly scan; see :func:`tomo_scan_setup`."""
    tomo = yield from tomo_scan_setup(devices, request, context)
    return TomoFlyScanSetup(tomo=tomo)


def micrograph_setup(microscope: Microscope, request: MicrographRequest, context: PlanContext):
    """Plan stub (preflight) of a micrograph: read the microscope, check, return the setup."""
    state = yield from read_microscope_state(microscope)
    problems = check_micrograph(request, state)
    if problems:
        raise PlanValidationError(request.plan_name, problems)
    return MicrographSetup(
        stage=microscope.stage,
        detector=microscope.detector,
        instrument=microscope.name,
        facility=microscope.facility,
        frame=microscope.frame,
        request=request,
        context=context,
        state=state,
    )


_CONTEXT_ARGUMENTS = ("sample", "parent_uids", "md")


def request_and_context(request_model: type, plan_name: str, kwargs: Mapping[str, Any]) -> tuple[Any, PlanContext]:
    """Build a plan's request model and its :class:`PlanContext` from its keyword arguments (pure),
    raising one :class:`PlanValidationError` that lists the problems of both."""
    context_kwargs = {k: kwargs[k] for k in _CONTEXT_ARGUMENTS if k in kwargs}
    request_kwargs = {k: v for k, v in kwargs.items() if k not in _CONTEXT_ARGUMENTS}
    problems: list[str] = []
    request = context = None
    try:
        request = request_model.build(**request_kwargs)
    except PlanValidationError as exc:
        problems += exc.problems
    try:
        context = plan_context(plan_name, **context_kwargs)
    except PlanValidationError as exc:
        problems += exc.problems
    if problems:
        raise PlanValidationError(plan_name, problems)
    return request, context


def validate_tomo_scan(beamline: Any, **kwargs: Any) -> TomoScanSetup:
    """Build and check ``tomo_scan(beamline, **kwargs)`` now, reading the beamline directly.

    For estimates and for the plans that take a tomography as one step of theirs; ``tomo_scan``
    itself checks the instrument in its preflight, through the RunEngine.
    """
    devices = tomo_devices(beamline)
    request, context = request_and_context(TomoScanRequest, "tomo_scan", kwargs)
    return read_now(tomo_scan_setup(devices, request, context))


def validate_tomo_fly_scan(beamline: Any, **kwargs: Any) -> TomoFlyScanSetup:
    """As :func:`validate_tomo_scan`, for ``tomo_fly_scan``."""
    devices = tomo_devices(beamline)
    request, context = request_and_context(TomoFlyScanRequest, "tomo_fly_scan", kwargs)
    return read_now(tomo_fly_scan_setup(devices, request, context))


def microscope_of(microscope: Any) -> Microscope:
    if not isinstance(microscope, Microscope):
        raise PlanValidationError("micrograph", [f"microscope must be a Microscope, got {microscope!r}"])
    return microscope


def validate_micrograph(microscope: Any, **kwargs: Any) -> MicrographSetup:
    """As :func:`validate_tomo_scan`, for ``micrograph``."""
    microscope = microscope_of(microscope)
    request, context = request_and_context(MicrographRequest, "micrograph", kwargs)
    return read_now(micrograph_setup(microscope, request, context))


def estimate_tomo_fly_scan(beamline: Any, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of ``tomo_fly_scan(beamline, **kwargs)`` (validates first)."""
    setup = validate_tomo_fly_scan(beamline, **kwargs)
    tomo = setup.tomo
    step = _estimate_tomo(tomo)
    rotation_v, x_v = setup.nominal_velocity_deg_per_s, tomo.state.x.velocity
    references_s = (tomo.num_darks + tomo.num_flats) * tomo.exposure_s + _x_travel_um(tomo) / x_v
    motion_s = (
        abs(setup.first_deg - tomo.initial_rotation_deg) / rotation_v
        + (setup.last_deg - setup.first_deg) / setup.velocity_deg_per_s
        + abs(setup.last_deg - tomo.initial_rotation_deg) / rotation_v
    )
    shutter_s = 3 * tomo.state.shutter_actuation_s
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
    return _estimate_tomo(validate_tomo_scan(beamline, **kwargs))


def _x_travel_um(setup: TomoScanSetup) -> float:
    """Stage x path (um): out for the flats, to the projection position (offset centre), back to the start."""
    flat, axis = setup.flat_offset_x_um, setup.axis_offset_um
    return abs(flat) + abs(flat - axis) + abs(axis)


def _estimate_tomo(setup: TomoScanSetup) -> PlanEstimate:
    state = setup.state
    rotation_v, x_v = state.rotation.velocity, state.x.velocity
    angles = setup.angles_deg
    motion_s = (
        abs(angles[0] - setup.initial_rotation_deg) / rotation_v
        + abs(angles[-1] - angles[0]) / rotation_v
        + abs(angles[-1] - setup.initial_rotation_deg) / rotation_v
        + _x_travel_um(setup) / x_v
    )
    shutter_s = 3 * state.shutter_actuation_s  # close, open, close
    duration_s = setup.n_frames * setup.exposure_s + motion_s + shutter_s
    return PlanEstimate(duration_s=duration_s, data_bytes=state.detector.frame_bytes(setup.n_frames), n_frames=setup.n_frames)


def estimate_micrograph(microscope: Any, **kwargs: Any) -> PlanEstimate:
    """Duration and data volume of ``micrograph(microscope, **kwargs)`` (validates first)."""
    setup = validate_micrograph(microscope, **kwargs)
    state = setup.state
    travel_s = max(
        abs(setup.stage_x_um - state.x.position) / state.x.velocity,
        abs(setup.stage_y_um - state.y.position) / state.y.velocity,
    )
    exposure_s = setup.exposure_s if setup.exposure_s is not None else state.detector.exposure_s
    return PlanEstimate(duration_s=travel_s + exposure_s, data_bytes=state.detector.frame_bytes(1), n_frames=1)

def summarize_messages(plan: Generator[Msg, Any, Any]) -> dict[str, Any]:
    """Walk a plan without a RunEngine and count what it would do; nothing moves.

    Parameters
    ----------
    plan
        A plan (generator of ``Msg``), e.g. ``tomo_scan(beamline, ...)``. Its ``read`` and ``locate``
        messages (the preflight's and the plan's own reads) are answered from the devices, so the
        preflight checks run as they would in a RunEngine; other messages get ``None``, as with
        ``list(plan)``.

    Returns
    -------
    dict
        ``{"messages": {command: count}, "events": {stream: count}, "runs": n, "total": n}``:
        messages by command, events per stream (``create`` messages by stream name), runs opened,
        and the total number of messages.

    Raises
    ------
    PlanValidationError
        The plan's preflight found a problem.
    """
    commands: Counter[str] = Counter()
    events: Counter[str] = Counter()
    reply: Any = None
    while True:
        try:
            msg = plan.send(reply)
        except StopIteration:
            break
        commands[msg.command] += 1
        reply = answer_read(msg) if msg.command in READ_COMMANDS else None
        if msg.command == "create":
            events[msg.kwargs.get("name", msg.args[0] if msg.args else "primary")] += 1
    return {
        "messages": dict(commands),
        "events": dict(events),
        "runs": commands.get("open_run", 0),
        "total": sum(commands.values()),
    }
