"""In-situ plans: a temperature series of tomography scans, and a time-lapse at a held temperature.

- :func:`temperature_series`: for each setpoint, change the furnace setpoint, wait until the
  measured temperature has stayed within ``tolerance_K`` for ``settle_s`` (the heater's ``set``
  finishes only then), then run a complete :func:`~corrflow.plans.tomography.tomo_scan` (or
  :func:`~corrflow.plans.fly.tomo_fly_scan`). One run per temperature; every run records the
  series it belongs to (``series_uid``, index, setpoint) and the measured temperature per frame.
  All scans are validated before the first message.
- :func:`time_lapse`: settle at a temperature, take dark and flat fields, then radiographs at a
  fixed angle every ``interval_s`` (the detector's own frame period, so the timing does not
  depend on the RunEngine), each with its time stamp and sample temperature recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from corrflow.devices.beamline import Beamline
from corrflow.plans.fly import tomo_fly_scan
from corrflow.plans.metadata import (
    Sample,
    build_start_metadata,
    identification_metadata,
    references_metadata,
    settings_metadata,
)
from corrflow.plans.tomography import reference_frames, tomo_scan
from corrflow.plans.validation import (
    MAX_EXPOSURE_S,
    PlanEstimate,
    _Checks,
    estimate_tomo_fly_scan,
    estimate_tomo_scan,
    tomo_devices,
    validate_tomo_scan,
)

__all__ = ["estimate_temperature_series", "estimate_time_lapse", "temperature_series", "time_lapse"]

MAX_SETPOINTS = 1000
# Settling takes a few time constants after the ramp (estimates only).
_SETTLE_TIME_CONSTANTS = 5.0


def _check_heater(checks: _Checks, heater: Any, *, tolerance_K: Any, settle_s: Any) -> tuple[float | None, float | None]:
    if heater is None:
        checks.fail("the beamline has no heater")
        return None, None
    tolerance = checks.number("tolerance_K", tolerance_K, unit="K", gt=0.0)
    settle = checks.number("settle_s", settle_s, unit="s")
    if settle is not None and settle < 0:
        checks.fail(f"settle_s must be >= 0 s, got {settle}")
    return tolerance, settle


def _check_setpoints(checks: _Checks, heater: Any, temperatures_K: Any) -> tuple[float, ...]:
    if isinstance(temperatures_K, str) or not isinstance(temperatures_K, Sequence) or not temperatures_K:
        checks.fail(f"temperatures_K must be a non-empty sequence of temperatures in K, got {temperatures_K!r}")
        return ()
    if len(temperatures_K) > MAX_SETPOINTS:
        checks.fail(f"temperatures_K holds {len(temperatures_K)} setpoints; at most {MAX_SETPOINTS}")
    values = []
    for k, value in enumerate(temperatures_K):
        checked = checks.number(f"temperatures_K[{k}]", value, unit="K")
        if checked is None or heater is None:
            continue
        try:
            heater.check_value(checked)
        except ValueError as exc:
            checks.fail(f"temperatures_K[{k}]: {exc}")
            continue
        values.append(checked)
    return tuple(values)


def temperature_series(
    beamline: Beamline,
    *,
    temperatures_K: Sequence[float],
    num_projections: int,
    exposure_s: float,
    sample: Sample | Mapping[str, str],
    tolerance_K: float = 1.0,
    settle_s: float = 30.0,
    fly: bool = False,
    start_deg: float = 0.0,
    rotation_range_deg: float = 180.0,
    num_darks: int = 10,
    num_flats: int = 10,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[list[str]]:
    """Validate a temperature series and return its plan: ramp, settle, scan, for each setpoint.

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline` with a heater.
    temperatures_K
        Setpoints in the order visited (K), each within the heater's range.
    num_projections, exposure_s, start_deg, rotation_range_deg, num_darks, num_flats
        The tomography scan at each setpoint (see :func:`~corrflow.plans.tomography.tomo_scan`).
    sample
        Identification of the sample.
    tolerance_K
        Settled: every reading within this of the setpoint (K, > 0) ...
    settle_s
        ... for this long (s, >= 0; simulated seconds on simulated devices).
    fly
        Continuous-rotation scans (:func:`~corrflow.plans.fly.tomo_fly_scan`) instead of steps.
    parent_uids, md
        References and extra metadata for every run.

    Returns
    -------
    MsgGenerator[list[str]]
        The plan; it returns the run uids, one per setpoint.

    Raises
    ------
    PlanValidationError
        On any bad argument, for any setpoint, before anything moves.
    """
    devices = tomo_devices(beamline)
    heater = devices.heater
    checks = _Checks()
    tolerance, settle = _check_heater(checks, heater, tolerance_K=tolerance_K, settle_s=settle_s)
    setpoints = _check_setpoints(checks, heater, temperatures_K)
    if not isinstance(fly, bool):
        checks.fail(f"fly must be True or False, got {fly!r}")
    user_md = checks.metadata(md)
    checks.raise_if_any("temperature_series")
    series_uid = str(uuid.uuid4())
    scan = tomo_fly_scan if fly else tomo_scan
    scans = []
    for k, setpoint in enumerate(setpoints):
        series = {"series_uid": series_uid, "index": k, "num_setpoints": len(setpoints), "setpoint_K": setpoint,
                  "tolerance_K": tolerance, "settle_s": settle, "setpoints_K": list(setpoints)}
        # Every scan is built (and so validated) now, before the first message.
        scans.append(
            scan(
                beamline,
                num_projections=num_projections,
                exposure_s=exposure_s,
                sample=sample,
                start_deg=start_deg,
                rotation_range_deg=rotation_range_deg,
                num_darks=num_darks,
                num_flats=num_flats,
                parent_uids=parent_uids,
                md={**user_md, "temperature_series": series},
            )
        )

    def plan() -> MsgGenerator[list[str]]:
        yield from bps.mv(heater.tolerance_K, tolerance, heater.settle_s, settle)
        uids = []
        for setpoint, scan_plan in zip(setpoints, scans, strict=True):
            yield from bps.mv(heater, setpoint)  # finishes once settled
            uids.append((yield from scan_plan))
        return uids

    return plan()


def estimate_temperature_series(beamline: Beamline, **kwargs: Any) -> PlanEstimate:
    """Duration and data of :func:`temperature_series`: ramps, settling, and the scans."""
    temperature_series(beamline, **kwargs)  # validates everything
    devices = tomo_devices(beamline)
    heater = devices.heater
    setpoints = [float(t) for t in kwargs["temperatures_K"]]
    scan_kwargs = {k: v for k, v in kwargs.items() if k not in ("temperatures_K", "tolerance_K", "settle_s", "fly")}
    per_scan = (estimate_tomo_fly_scan if kwargs.get("fly") else estimate_tomo_scan)(beamline, **scan_kwargs)
    ramp = float(heater.ramp_rate_K_per_s.get())
    tau = float(heater.time_constant_s.get())
    settle = float(kwargs.get("settle_s", 30.0))
    previous = float(heater.position)
    heating_s = 0.0
    for setpoint in setpoints:
        heating_s += abs(setpoint - previous) / ramp + _SETTLE_TIME_CONSTANTS * tau + settle
        previous = setpoint
    n = len(setpoints)
    return PlanEstimate(duration_s=heating_s + n * per_scan.duration_s, data_bytes=n * per_scan.data_bytes, n_frames=n * per_scan.n_frames)


def _validate_time_lapse(beamline: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    devices = tomo_devices(beamline)
    checks = _Checks()
    frames = checks.integer("num_frames", kwargs["num_frames"], minimum=1, maximum=100_000)
    interval = checks.number("interval_s", kwargs["interval_s"], unit="s", gt=0.0, le=86_400.0)
    exposure = checks.number("exposure_s", kwargs["exposure_s"], unit="s", gt=0.0, le=MAX_EXPOSURE_S)
    if interval is not None and exposure is not None and interval < exposure:
        checks.fail(f"interval_s ({interval}) must be at least exposure_s ({exposure})")
    angle = checks.number("angle_deg", kwargs["angle_deg"], unit="deg")
    if angle is not None:
        low, high = devices.stage.rotation.limits
        if not low <= angle <= high:
            checks.fail(f"angle_deg ({angle}) is outside the rotation limits [{low}, {high}] deg")
    temperature = kwargs["temperature_K"]
    tolerance = settle = None
    if temperature is not None:
        tolerance, settle = _check_heater(checks, devices.heater, tolerance_K=kwargs["tolerance_K"], settle_s=kwargs["settle_s"])
        (temperature,) = _check_setpoints(checks, devices.heater, [temperature]) or (None,)
    checks.raise_if_any("time_lapse")
    # The references (darks, flats, sample, metadata) are checked as those of a scan would be.
    references = validate_tomo_scan(
        beamline, num_projections=2, exposure_s=exposure, sample=kwargs["sample"], num_darks=kwargs["num_darks"],
        num_flats=kwargs["num_flats"], parent_uids=kwargs["parent_uids"], md=kwargs["md"],
    )
    # Disk: the time-lapse frames on top of the reference frames.
    checks.disk_space(devices.detector, n_frames=frames + references.num_darks + references.num_flats)
    checks.raise_if_any("time_lapse")
    return dict(devices=devices, frames=frames, interval=interval, exposure=exposure, angle=angle, temperature=temperature,
                tolerance=tolerance, settle=settle, references=references)


def time_lapse(
    beamline: Beamline,
    *,
    num_frames: int,
    interval_s: float,
    exposure_s: float,
    sample: Sample | Mapping[str, str],
    temperature_K: float | None = None,
    tolerance_K: float = 1.0,
    settle_s: float = 30.0,
    angle_deg: float = 0.0,
    num_darks: int = 5,
    num_flats: int = 5,
    parent_uids: Sequence[str] = (),
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[str]:
    """Validate and return a time-lapse: radiographs every ``interval_s`` at a held temperature.

    Parameters
    ----------
    beamline
        A :class:`~corrflow.devices.beamline.Beamline`.
    num_frames
        Radiographs taken (>= 1).
    interval_s
        Time between frame starts (s, >= ``exposure_s``; simulated seconds on simulated devices).
    exposure_s
        Exposure of every frame (s, > 0).
    sample
        Identification of the sample.
    temperature_K
        Setpoint to settle at first and hold (K); ``None`` keeps the furnace as it is.
    tolerance_K, settle_s
        Settle criterion (see :func:`temperature_series`).
    angle_deg
        Rotation angle of the radiographs (deg).
    num_darks, num_flats
        Reference frames taken before the time-lapse.
    parent_uids, md
        References and extra metadata.

    Returns
    -------
    MsgGenerator[str]
        The plan; it returns the run uid.
    """
    request = _validate_time_lapse(beamline, locals())
    devices, references = request["devices"], request["references"]
    stage, detector, heater = devices.stage, devices.detector, devices.heater
    parameters = {
        "num_frames": request["frames"], "interval_s": request["interval"], "exposure_s": request["exposure"],
        "angle_deg": request["angle"], "temperature_K": request["temperature"], "tolerance_K": request["tolerance"],
        "settle_s": request["settle"], "num_darks": references.num_darks, "num_flats": references.num_flats,
        "flat_offset_x_um": references.flat_offset_x_um,
    }
    units = {"num_frames": "", "interval_s": "s", "exposure_s": "s", "angle_deg": "deg", "temperature_K": "K",
             "tolerance_K": "K", "settle_s": "s", "num_darks": "", "num_flats": "", "flat_offset_x_um": "um"}
    start_md = build_start_metadata(
        identification=identification_metadata(references.sample, facility=devices.facility, instrument=devices.instrument),
        references=references_metadata(frame=devices.frame, parent_uids=references.parent_uids),
        settings=settings_metadata("time_lapse", parameters, units=units),
        md=references.md,
        plan_name="time_lapse",
        plan_args=parameters,
        detectors=[detector.name],
        motors=[stage.rotation.name],
        num_points=request["frames"],
        planned_events={"dark": references.num_darks, "flat": references.num_flats, "primary": request["frames"]},
        hints={"dimensions": [([f"{detector.name}_timestamp"], "primary")]},
    )

    def frames() -> MsgGenerator[None]:
        x0 = yield from bps.rd(stage.x, default_value=references.initial_x_um)
        yield from reference_frames(references, x0=x0)
        yield from bps.mv(stage.rotation, request["angle"])
        yield from bps.prepare(detector, {"num_frames": request["frames"], "period_s": request["interval"]}, wait=True)

        @bpp.stage_decorator([detector])
        def lapse() -> MsgGenerator[None]:
            yield from bps.declare_stream(detector, name="primary", collect=True)
            yield from bps.kickoff(detector, wait=True)
            yield from bps.complete(detector, wait=True)
            yield from bps.collect(detector, name="primary")

        yield from lapse()

    def restore() -> MsgGenerator[None]:
        yield from bps.mv(devices.shutter, "closed", stage.rotation, references.initial_rotation_deg)

    def plan() -> MsgGenerator[str]:
        if request["temperature"] is not None:
            yield from bps.mv(heater.tolerance_K, request["tolerance"], heater.settle_s, request["settle"])
            yield from bps.mv(heater, request["temperature"])  # finishes once settled

        @bpp.run_decorator(md=start_md)
        def run() -> MsgGenerator[None]:
            yield from bpp.finalize_wrapper(frames(), restore())

        return (yield from run())

    return plan()


def estimate_time_lapse(beamline: Beamline, **kwargs: Any) -> PlanEstimate:
    """Duration and data of :func:`time_lapse` (validates first)."""
    from corrflow.plans.mosaic import _with_defaults

    request = _validate_time_lapse(beamline, _with_defaults(time_lapse, kwargs))
    references, detector = request["references"], request["devices"].detector
    n = request["frames"] + references.num_darks + references.num_flats
    rows, cols = detector.frame_shape_px
    duration = (references.num_darks + references.num_flats) * request["exposure"] + (request["frames"] - 1) * request["interval"] + request["exposure"]
    if request["temperature"] is not None:
        heater = request["devices"].heater
        duration += abs(request["temperature"] - float(heater.position)) / float(heater.ramp_rate_K_per_s.get())
        duration += _SETTLE_TIME_CONSTANTS * float(heater.time_constant_s.get()) + request["settle"]
    return PlanEstimate(duration_s=duration, data_bytes=n * rows * cols * np.dtype(detector.frame_dtype).itemsize, n_frames=n)
