"""The X-ray source IOC: storage-ring current and the beamline shutter.

PVs (prefix ``<instrument>src:``):

``RingCurrent_RBV``          stored current (mA): nominal with 0.01 % noise, 0 while the beam is lost
``shutter:Cmd``              ``Close`` / ``Open``; the put completes at once, the blade then moves
``shutter:State_RBV``        ``closed`` / ``open``; "closed" as soon as closing starts and until fully
                             open (a frame taken in between is never mistaken for a flat)
``shutter:ActuationTime_RBV``  blade travel time (s)
``sim:BeamAvailable``        simulation control: ``No`` drops the beam, ``Yes`` restores it
``sim:DumpFor``              simulation control: writing N drops the beam now and restores it N s later
``sim:PutCount``             client writes received
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from caproto.server import PVGroup, SubGroup, pvproperty

from corrflow.simulators.ioc.common import SimControl, enum_property, ioc_argument_parser, serve

__all__ = ["SourceIOC", "main"]


class SourceSimControl(SimControl):
    """Write counter plus the beam-loss controls."""

    beam_available = enum_property("BeamAvailable", states=("No", "Yes"), value="Yes", doc="No drops the beam")
    dump_for = pvproperty(name="DumpFor", value=0.0, precision=2, units="s", doc="drop the beam for this long")

    @beam_available.putter
    async def beam_available(self, instance: Any, value: Any) -> str:
        state = "Yes" if value in ("Yes", 1) else "No"
        self.parent.cancel_restore()
        await self.parent.set_beam(state == "Yes")
        return state

    @dump_for.putter
    async def dump_for(self, instance: Any, value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{instance.pvname}: duration must be >= 0 s, got {value}")
        await self.parent.dump(value)
        return value


class ShutterGroup(PVGroup):
    """The beamline shutter (prefix ``<source>shutter:``)."""

    cmd = enum_property("Cmd", states=("Close", "Open"), doc="Open or Close")
    state = enum_property("State_RBV", states=("closed", "open"), read_only=True)
    actuation_time = pvproperty(name="ActuationTime_RBV", value=0.05, precision=3, units="s", read_only=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._motion: asyncio.Task[None] | None = None

    @cmd.putter
    async def cmd(self, instance: Any, value: Any) -> str:
        target = "open" if value in ("Open", 1) else "closed"
        if self._motion is not None and not self._motion.done():
            self._motion.cancel()
        if target == "closed":
            await self.state.write("closed")  # the beam is blocked as soon as the blade moves
        if self.state.value != target:
            self._motion = asyncio.get_running_loop().create_task(self._actuate(target))
        return "Open" if target == "open" else "Close"

    async def _actuate(self, target: str) -> None:
        await asyncio.sleep(float(self.actuation_time.value))
        await self.state.write(target)


class SourceIOC(PVGroup):
    """Ring current with beam loss on demand, and the shutter.

    Parameters
    ----------
    nominal_current_mA
        Stored current with beam (mA, > 0).
    update_hz
        Current updates per second.
    """

    sim = SubGroup(SourceSimControl, prefix="sim:")
    shutter = SubGroup(ShutterGroup, prefix="shutter:")
    current = pvproperty(name="RingCurrent_RBV", value=0.0, precision=3, units="mA", read_only=True, doc="stored current")

    def __init__(self, *args: Any, nominal_current_mA: float = 200.0, update_hz: float = 5.0, seed: int = 7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not (math.isfinite(nominal_current_mA) and nominal_current_mA > 0):
            raise ValueError(f"nominal_current_mA must be > 0, got {nominal_current_mA}")
        self.nominal_current_mA = float(nominal_current_mA)
        self.update_hz = float(update_hz)
        self._beam = True
        self._restore: asyncio.Task[None] | None = None
        self._rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7777]))

    def _reading(self) -> float:
        if not self._beam:
            return 0.0
        return float(self.nominal_current_mA * (1.0 + 1e-4 * self._rng.standard_normal()))

    async def set_beam(self, available: bool) -> None:
        self._beam = available
        await self.current.write(self._reading())  # at once: a beam loss must not wait for the next update
        if self.sim.beam_available.value != ("Yes" if available else "No"):
            await self.sim.beam_available.write("Yes" if available else "No", verify_value=False)

    def cancel_restore(self) -> None:
        if self._restore is not None and not self._restore.done():
            self._restore.cancel()
        self._restore = None

    async def dump(self, duration_s: float) -> None:
        self.cancel_restore()
        await self.set_beam(False)

        async def restore() -> None:
            await asyncio.sleep(duration_s)
            await self.set_beam(True)

        self._restore = asyncio.get_running_loop().create_task(restore())

    @current.startup
    async def current(self, instance: Any, async_lib: Any) -> None:
        period_s = 1.0 / self.update_hz
        while True:
            await self.current.write(self._reading())
            await asyncio.sleep(period_s)


def main(argv: list[str] | None = None) -> None:
    """``python -m corrflow.simulators.ioc source --prefix P [--port N]``."""
    parser = ioc_argument_parser("Simulated X-ray source: ring current and shutter.", default_section="src:")
    parser.add_argument("--nominal-current", type=float, default=200.0, help="stored current with beam (mA)")
    args = parser.parse_args(argv)
    group = SourceIOC(prefix=args.prefix + args.section, nominal_current_mA=args.nominal_current)
    serve(group, port=args.port, list_pvs=args.list_pvs, verbose=args.verbose)
