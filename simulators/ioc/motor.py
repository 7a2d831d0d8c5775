"""A simulated EPICS motor record and the stage IOCs built from it.

:class:`MotorRecord` serves the fields of a motor record that ophyd's ``EpicsMotor`` uses
(``NAME`` = ``NAME.VAL``, ``.RBV``, ``.DMOV``, ``.MOVN``, ``.STOP``, ``.VELO``, ``.ACCL``,
``.HLM``/``.LLM``, ``.HLS``/``.LLS``, ``.EGU``, ``.TDIR``, ``.LVIO``, ``.SET``, ``.OFF``, ``.DIR``,
``.FOFF``, ``.HOMF``/``.HOMR``, ``.DESC``, ``.PREC``) with motion in wall-clock time:

- a write to ``.VAL`` inside the soft limits starts a move at ``.VELO`` (EGU/s): ``.DMOV`` goes to 0
  and ``.MOVN`` to 1, ``.RBV`` is updated at :data:`TICK_HZ`, and at the target ``.MOVN`` goes to 0
  and ``.DMOV`` back to 1 (a move of zero length still pulses ``.DMOV`` 1 -> 0 -> 1, which is how
  clients see completion);
- a target outside ``[.LLM, .HLM]`` is refused: the write fails and nothing moves. The limits are
  also the control limits of ``.VAL`` (what ``EpicsMotor.limits`` reads), which caproto enforces
  before the record sees the value (a real record accepts the write and sets ``.LVIO``);
- ``.STOP`` = 1 halts the motion where it is and sets ``.VAL`` to the position reached;
- a new ``.VAL`` while moving re-targets without pulsing ``.DMOV``;
- ``.SET`` = 1 ("Set" mode) makes a ``.VAL`` write redefine the current position without moving;
- fault injection for tests: ``NAME:sim:Stall`` = 1 freezes a move where it is (``.DMOV`` stays 0,
  as with a tripped amplifier), 0 lets it carry on.

Offsets (``.OFF``, ``.DIR``, ``.FOFF``) and homing are served read-only at their neutral values:
this simulator has no dial/user distinction and no home switch.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from caproto import ChannelType
from caproto.server import PVGroup, SubGroup, pvproperty

from corrflow.simulators.ioc.common import SimControl, enum_property, ioc_argument_parser, serve

__all__ = [
    "MicroscopeStageMotors",
    "MotorRecord",
    "SampleStageIOC",
    "SampleStageMotors",
    "TICK_HZ",
    "alias_record_names",
    "main",
    "scale_velocities",
]

TICK_HZ = 50.0
# Readback updates per second while moving: smooth for clients, a few hundred CA messages per move.


class MotorRecord(PVGroup):
    """The motor-record fields ``EpicsMotor`` uses, with simulated motion (prefix = record name).

    Parameters
    ----------
    egu
        Engineering unit, e.g. ``"um"`` or ``"deg"``.
    limits
        Soft limits ``(low, high)`` (EGU), ``low < high``.
    velocity
        Speed (EGU per wall-clock second, > 0).
    init_pos
        Initial position (EGU).
    description
        ``.DESC``.
    """

    val = pvproperty(name=".VAL", value=0.0, precision=4, doc="user setpoint (EGU)")
    rbv = pvproperty(name=".RBV", value=0.0, precision=4, read_only=True, doc="user readback (EGU)")
    dmov = pvproperty(name=".DMOV", value=1, read_only=True, doc="done moving")
    movn = pvproperty(name=".MOVN", value=0, read_only=True, doc="moving")
    stop_ = pvproperty(name=".STOP", value=0, doc="write 1 to stop")
    velo = pvproperty(name=".VELO", value=1.0, precision=4, doc="velocity (EGU/s)")
    accl = pvproperty(name=".ACCL", value=0.2, precision=3, doc="seconds to velocity (recorded, not simulated)")
    egu = pvproperty(name=".EGU", value="", dtype=ChannelType.STRING, doc="engineering unit")
    hlm = pvproperty(name=".HLM", value=0.0, precision=4, doc="user high limit (EGU)")
    llm = pvproperty(name=".LLM", value=0.0, precision=4, doc="user low limit (EGU)")
    hls = pvproperty(name=".HLS", value=0, read_only=True, doc="at high limit switch")
    lls = pvproperty(name=".LLS", value=0, read_only=True, doc="at low limit switch")
    tdir = pvproperty(name=".TDIR", value=0, read_only=True, doc="direction of travel (1 positive)")
    lvio = pvproperty(name=".LVIO", value=0, read_only=True, doc="limit violation")
    set_ = enum_property(".SET", states=("Use", "Set"), doc="Set mode: VAL redefines the position")
    off = pvproperty(name=".OFF", value=0.0, read_only=True, doc="user offset (not simulated)")
    dir_ = enum_property(".DIR", states=("Pos", "Neg"), read_only=True, doc="user direction (not simulated)")
    foff = enum_property(".FOFF", states=("Variable", "Frozen"), read_only=True, doc="offset freeze (not simulated)")
    homf = pvproperty(name=".HOMF", value=0, read_only=True, doc="home forward (no home switch simulated)")
    homr = pvproperty(name=".HOMR", value=0, read_only=True, doc="home reverse (no home switch simulated)")
    desc = pvproperty(name=".DESC", value="", dtype=ChannelType.STRING, doc="description")
    prec = pvproperty(name=".PREC", value=4, read_only=True, doc="display precision")
    # Fault injection (a stalled amplifier or a stuck encoder): while 1, a move makes no progress and
    # never reports done; at 0 it carries on. Not a motor-record field.
    stall = pvproperty(name=":sim:Stall", value=0, doc="simulated fault: 1 = the motion stalls (DMOV stays 0)")

    def __init__(
        self,
        *args: Any,
        egu: str,
        limits: tuple[float, float],
        velocity: float,
        init_pos: float = 0.0,
        description: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        low, high = (float(v) for v in limits)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"{self.prefix}: limits must be finite with low < high, got {limits!r}")
        if not (math.isfinite(velocity) and velocity > 0):
            raise ValueError(f"{self.prefix}: velocity must be > 0, got {velocity!r}")
        if not low <= init_pos <= high:
            raise ValueError(f"{self.prefix}: init_pos {init_pos} outside the limits {limits!r}")
        self._config = {"egu": egu, "low": low, "high": high, "velocity": float(velocity), "init": float(init_pos)}
        self._description = description
        self._motion: asyncio.Task[None] | None = None

    # -- start-up ------------------------------------------------------------------------------
    @val.startup
    async def val(self, instance: Any, async_lib: Any) -> None:
        config = self._config
        await self.egu.write(config["egu"])
        await self.desc.write(self._description[:39])
        await self.velo.write(config["velocity"])
        # Both limits at once (each putter checks against the other, which is not set yet).
        await self.llm.write(config["low"], verify_value=False)
        await self.hlm.write(config["high"], verify_value=False)
        await self._publish_limits(config["low"], config["high"])
        await self.rbv.write(config["init"])
        await self.val.write(config["init"], verify_value=False)

    # -- limits ----------------------------------------------------------------------------------
    async def _publish_limits(self, low: float, high: float) -> None:
        # EpicsMotor.limits are the control limits of .VAL: keep them equal to LLM/HLM.
        for channel in (self.val, self.rbv):
            await channel.write_metadata(lower_ctrl_limit=low, upper_ctrl_limit=high, lower_disp_limit=low, upper_disp_limit=high)

    @hlm.putter
    async def hlm(self, instance: Any, value: float) -> float:
        value = float(value)
        if not math.isfinite(value) or value <= self.llm.value:
            raise ValueError(f"{instance.pvname}: high limit must be finite and above LLM={self.llm.value}, got {value}")
        await self._publish_limits(self.llm.value, value)
        return value

    @llm.putter
    async def llm(self, instance: Any, value: float) -> float:
        value = float(value)
        if not math.isfinite(value) or value >= self.hlm.value:
            raise ValueError(f"{instance.pvname}: low limit must be finite and below HLM={self.hlm.value}, got {value}")
        await self._publish_limits(value, self.hlm.value)
        return value

    @velo.putter
    async def velo(self, instance: Any, value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{instance.pvname}: velocity must be > 0, got {value}")
        return value

    # -- motion ----------------------------------------------------------------------------------
    @val.putter
    async def val(self, instance: Any, value: float) -> float:
        target = float(value)
        low, high = self.llm.value, self.hlm.value
        if not (math.isfinite(target) and low <= target <= high):
            await self.lvio.write(1)
            raise ValueError(f"{instance.pvname}: target {target} is outside the soft limits [{low}, {high}]")
        await self.lvio.write(0)
        if self.set_.value == "Set":
            await self._cancel_motion()
            await self.rbv.write(target)
            return target
        await self._cancel_motion()
        self._motion = asyncio.get_running_loop().create_task(self._move(target))
        return target

    @stop_.putter
    async def stop_(self, instance: Any, value: int) -> int:
        if value:
            moving = await self._cancel_motion()
            if moving:
                await self.val.write(self.rbv.value, verify_value=False)
                await self.movn.write(0)
                await self.dmov.write(1)
        return 0  # STOP resets itself

    async def _cancel_motion(self) -> bool:
        """Cancel a move in progress (leaving DMOV/MOVN to the caller); True if one was running."""
        task, self._motion = self._motion, None
        if task is None or task.done():
            return False
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # The cancelled move ends here; the caller either re-targets or posts the stop.
            pass
        return True

    async def _move(self, target: float) -> None:
        loop = asyncio.get_running_loop()
        start = float(self.rbv.value)
        velocity = float(self.velo.value)
        distance = target - start
        duration_s = abs(distance) / velocity
        direction = 1.0 if distance >= 0 else -1.0
        await self.tdir.write(1 if distance >= 0 else 0)
        if self.dmov.value != 0:
            await self.dmov.write(0)
        await self.movn.write(1)
        t0 = loop.time()
        tick_s = 1.0 / TICK_HZ
        while True:
            if self.stall.value:
                stalled_at = loop.time()
                while self.stall.value:
                    await asyncio.sleep(tick_s)
                t0 += loop.time() - stalled_at  # the travel left is the same as before the stall
            elapsed_s = loop.time() - t0
            if elapsed_s >= duration_s:
                break
            await self.rbv.write(start + direction * velocity * elapsed_s)
            await asyncio.sleep(min(tick_s, duration_s - elapsed_s))
        await self.rbv.write(target)
        self._motion = None
        await self.movn.write(0)
        await self.dmov.write(1)


def alias_record_names(group: PVGroup) -> None:
    """Serve each motor record's ``.VAL`` also under the bare record name (as an EPICS IOC does)."""
    for pvname in list(group.pvdb):
        if pvname.endswith(".VAL"):
            group.pvdb.setdefault(pvname[: -len(".VAL")], group.pvdb[pvname])


class SampleStageMotors(PVGroup):
    """Tomography sample stage: motors ``x``, ``y``, ``z`` (um), ``rot``, ``tip``, ``tilt`` (deg).

    Limits and nominal velocities as the simulated stage (:class:`corrflow.devices.stage.SampleStage`).
    """

    x = SubGroup(MotorRecord, prefix="x", egu="um", limits=(-5000.0, 5000.0), velocity=1000.0, description="sample x")
    y = SubGroup(MotorRecord, prefix="y", egu="um", limits=(-5000.0, 5000.0), velocity=1000.0, description="sample y (beam)")
    z = SubGroup(MotorRecord, prefix="z", egu="um", limits=(-2000.0, 2000.0), velocity=500.0, description="sample z (up)")
    rot = SubGroup(MotorRecord, prefix="rot", egu="deg", limits=(-360.0, 360.0), velocity=90.0, description="rotation")
    tip = SubGroup(MotorRecord, prefix="tip", egu="deg", limits=(-5.0, 5.0), velocity=1.0, description="tip")
    tilt = SubGroup(MotorRecord, prefix="tilt", egu="deg", limits=(-5.0, 5.0), velocity=1.0, description="tilt")


class SampleStageIOC(SampleStageMotors):
    """The sample stage served as an IOC (prefix ``<instrument>stage:``, with ``sim:PutCount``)."""

    sim = SubGroup(SimControl, prefix="sim:")


class MicroscopeStageMotors(PVGroup):
    """Microscope stage: motors ``x``, ``y`` (um) in the ``microscope_stage`` frame."""

    x = SubGroup(MotorRecord, prefix="x", egu="um", limits=(-10000.0, 10000.0), velocity=2000.0, description="stage x")
    y = SubGroup(MotorRecord, prefix="y", egu="um", limits=(-10000.0, 10000.0), velocity=2000.0, description="stage y")


def scale_velocities(group: PVGroup, speed: float) -> None:
    """Multiply the nominal velocity of every motor record in ``group`` by ``speed`` (> 0)."""
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be > 0, got {speed!r}")
    for record in _records(group):
        record._config["velocity"] *= speed


def _records(group: PVGroup) -> list[MotorRecord]:
    found = []
    for child in group.groups.values():
        if isinstance(child, MotorRecord):
            found.append(child)
        else:
            found.extend(_records(child))
    return found


def main(argv: list[str] | None = None) -> None:
    """``python -m corrflow.simulators.ioc stage --prefix P [--speed S] [--port N]``."""
    parser = ioc_argument_parser("Simulated tomography sample stage (6 motor records).", default_section="stage:")
    parser.add_argument("--speed", type=float, default=1.0, help="velocity factor over the nominal velocities")
    args = parser.parse_args(argv)
    group = SampleStageIOC(prefix=args.prefix + args.section)
    scale_velocities(group, args.speed)
    alias_record_names(group)
    serve(group, port=args.port, list_pvs=args.list_pvs, verbose=args.verbose)
