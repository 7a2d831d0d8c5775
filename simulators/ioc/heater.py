"""The furnace temperature controller IOC, backed by :class:`corrflow.simulators.HeaterModel`.

PVs (prefix ``<instrument>tc:``):

``Setpoint`` / ``Setpoint_RBV``    target (K); its control limits are the model's allowed range
``Temperature_RBV``                thermocouple reading (K): true temperature + sensor noise, at ``--update-hz``
``RampRate`` / ``RampRate_RBV``    largest |dT/dt| the controller allows (K/s, wall clock)
``TimeConstant_RBV``               thermal time constant (s, wall clock)
``Power_RBV``                      heating power (W) driving the first-order furnace
``sim:Kick``                       simulation control: adds this many K to the true temperature at once
                                   (a disturbance, e.g. for testing a suspender); reads back 0
``sim:PutCount``                   client writes received

``--time-scale`` runs the furnace faster than real time: the model's time constant is divided by
it and its ramp limit multiplied by it, and the PVs report those wall-clock values.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from caproto.server import PVGroup, SubGroup, pvproperty

from corrflow.simulators.heater import HeaterModel
from corrflow.simulators.ioc.common import SimControl, ioc_argument_parser, serve

__all__ = ["TemperatureControllerIOC", "main"]

HEAT_CAPACITY_J_PER_K = 2.0


class HeaterSimControl(SimControl):
    """Write counter plus the furnace's disturbance input."""

    kick = pvproperty(name="Kick", value=0.0, precision=2, units="K", doc="add this many K to the true temperature")

    @kick.putter
    async def kick(self, instance: Any, value: float) -> float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{instance.pvname}: kick must be finite, got {value}")
        self.parent.kick(value)
        return 0.0


class TemperatureControllerIOC(PVGroup):
    """A furnace controller: setpoint, ramp limit, noisy thermocouple, first-order lag.

    Parameters
    ----------
    time_scale
        Simulated seconds per wall-clock second of the furnace (> 0).
    update_hz
        Readback updates per second.
    seed
        Seed of the sensor noise.
    """

    sim = SubGroup(HeaterSimControl, prefix="sim:")
    setpoint = pvproperty(name="Setpoint", value=293.15, precision=2, units="K", doc="target temperature")
    setpoint_rbv = pvproperty(name="Setpoint_RBV", value=293.15, precision=2, units="K", read_only=True)
    temperature = pvproperty(name="Temperature_RBV", value=293.15, precision=3, units="K", read_only=True)
    ramp_rate = pvproperty(name="RampRate", value=5.0, precision=3, units="K/s", doc="largest |dT/dt|")
    ramp_rate_rbv = pvproperty(name="RampRate_RBV", value=5.0, precision=3, units="K/s", read_only=True)
    time_constant = pvproperty(name="TimeConstant_RBV", value=20.0, precision=3, units="s", read_only=True)
    power = pvproperty(name="Power_RBV", value=0.0, precision=3, units="W", read_only=True)

    def __init__(self, *args: Any, time_scale: float = 1.0, update_hz: float = 10.0, seed: int = 7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if not (math.isfinite(update_hz) and update_hz > 0):
            raise ValueError(f"update_hz must be > 0, got {update_hz}")
        nominal = HeaterModel()
        self.model = HeaterModel(
            time_constant_s=nominal.time_constant_s / time_scale, max_ramp_K_per_s=nominal.max_ramp_K_per_s * time_scale
        )
        self.update_hz = float(update_hz)
        self._rng = np.random.default_rng(np.random.SeedSequence([int(seed), 101]))

    def kick(self, delta_K: float) -> None:
        self.model.disturb(delta_K)

    @setpoint.putter
    async def setpoint(self, instance: Any, value: float) -> float:
        self.model.set_setpoint(float(value))  # ValueError outside the allowed range: the write fails
        return float(value)

    @ramp_rate.putter
    async def ramp_rate(self, instance: Any, value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{instance.pvname}: ramp rate must be > 0 K/s, got {value}")
        self.model.max_ramp_K_per_s = value
        return value

    @temperature.startup
    async def temperature(self, instance: Any, async_lib: Any) -> None:
        model = self.model
        for channel in (self.setpoint, self.setpoint_rbv):
            await channel.write_metadata(lower_ctrl_limit=model.min_setpoint_K, upper_ctrl_limit=model.max_K)
        await self.setpoint.write(model.setpoint_K, verify_value=False)
        await self.ramp_rate.write(model.max_ramp_K_per_s, verify_value=False)
        await self.time_constant.write(model.time_constant_s)
        loop = asyncio.get_running_loop()
        last = loop.time()
        period_s = 1.0 / self.update_hz
        while True:
            await asyncio.sleep(period_s)
            now = loop.time()
            model.advance(now - last)
            last = now
            await self.temperature.write(model.measure(self._rng))
            await self.power.write(self._power_W())

    def _power_W(self) -> float:
        # C dT/dt = P - C (T - T_ambient) / tau along the rate-limited trajectory.
        model = self.model
        tau, rate = model.time_constant_s, model.max_ramp_K_per_s
        dT_dt = min(max((model.setpoint_K - model.temperature_K) / tau, -rate), rate)
        return HEAT_CAPACITY_J_PER_K * (dT_dt + (model.temperature_K - model.ambient_K) / tau)


def main(argv: list[str] | None = None) -> None:
    """``python -m corrflow.simulators.ioc heater --prefix P [--time-scale S] [--port N]``."""
    parser = ioc_argument_parser("Simulated furnace temperature controller.", default_section="tc:")
    parser.add_argument("--time-scale", type=float, default=1.0, help="furnace runs this many times faster than real time")
    parser.add_argument("--update-hz", type=float, default=10.0, help="readback updates per second")
    parser.add_argument("--seed", type=int, default=7, help="seed of the sensor noise")
    args = parser.parse_args(argv)
    group = TemperatureControllerIOC(
        prefix=args.prefix + args.section, time_scale=args.time_scale, update_hz=args.update_hz, seed=args.seed
    )
    serve(group, port=args.port, list_pvs=args.list_pvs, verbose=args.verbose)
