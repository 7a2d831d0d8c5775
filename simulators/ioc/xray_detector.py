"""The tomography camera IOC: Beer-Lambert frames of the phantom at the stage's current geometry.

At the start and at the end of every exposure the IOC reads, over Channel Access, the other
IOCs of the simulated beamline: the rotation and x, y, z motor readbacks, the shutter state, the
furnace temperature and the ring current. The frame is :func:`corrflow.simulators.xray_frame`
of the phantom at the mean temperature, at the mean angle and translations (a frame taken while
the stage rotates integrates over the arc; the simulation samples its middle), with the beam
on only if the shutter was open at both ends and the flux scaled by the ring current. Those
values are recorded per frame as NDAttributes: ``RotationAngle`` (mid-exposure, deg),
``RotationAngleStart``, ``RotationAngleEnd``, ``SampleX``, ``SampleY``, ``SampleZ`` (um),
``ShutterOpen``, ``SampleTemperature`` (K), ``RingCurrent`` (mA), ``AcquireTime`` (s),
``TimeStamp`` (s since the epoch) and ``UniqueId``.

Without ``--stage-prefix`` (etc.) the geometry is fixed: angle 0, stage at 0, shutter open,
ambient temperature, nominal current.

PVs (prefix ``<instrument>det:``): ``cam1:...`` and ``HDF1:...`` (see :mod:`.area_detector`),
``optics:PixelSize_RBV`` (um at the sample), ``optics:Energy_RBV`` (keV),
``optics:Distance_RBV`` (sample-detector, mm), ``sim:PutCount``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from caproto.asyncio.client import Context
from caproto.server import PVGroup, SubGroup, pvproperty

from corrflow.config.settings import SimulationSettings
from corrflow.simulators.ioc.area_detector import AreaDetectorIOC
from corrflow.simulators.ioc.common import SimControl, ioc_argument_parser, serve
from corrflow.simulators.phantom import Phantom, make_phantom
from corrflow.simulators.world import SimulatedWorld
from corrflow.simulators.xray import xray_frame

__all__ = ["XrayDetectorIOC", "RemoteState", "main"]

AMBIENT_K = 293.15
NOMINAL_CURRENT_MA = 200.0
_READ_TIMEOUT_S = 2.0


class RemoteState:
    """Reads named PVs of other IOCs over Channel Access (caproto's asyncio client).

    Parameters
    ----------
    pvs
        ``{key: pv_name}``; a key with an empty name is not read.
    """

    def __init__(self, pvs: Mapping[str, str]) -> None:
        self._names = {key: name for key, name in pvs.items() if name}
        self._context: Context | None = None
        self._pvs: dict[str, Any] = {}

    async def read(self) -> dict[str, Any]:
        """``{key: value}`` read now (scalars; enums as their strings).

        Raises
        ------
        TimeoutError
            A PV did not answer within 2 s; the message names it.
        """
        if not self._names:
            return {}
        if self._context is None:
            self._context = Context()
            pvs = await self._context.get_pvs(*self._names.values(), timeout=_READ_TIMEOUT_S)
            self._pvs = dict(zip(self._names, pvs, strict=True))

        async def one(key: str) -> Any:
            try:
                reading = await self._pvs[key].read(timeout=_READ_TIMEOUT_S, data_type="native")
            except TimeoutError as exc:
                raise TimeoutError(f"no answer from {self._names[key]} within {_READ_TIMEOUT_S} s") from exc
            value = reading.data[0]
            return value.decode() if isinstance(value, bytes) else value

        values = await asyncio.gather(*(one(key) for key in self._names))
        return dict(zip(self._names, values, strict=True))


class OpticsGroup(PVGroup):
    """Fixed optics of the tomography camera (prefix ``<detector>optics:``)."""

    pixel_size = pvproperty(name="PixelSize_RBV", value=1.0, precision=4, units="um", read_only=True, doc="pixel size at the sample")
    energy = pvproperty(name="Energy_RBV", value=25.0, precision=3, units="keV", read_only=True, doc="photon energy")
    distance = pvproperty(name="Distance_RBV", value=0.0, precision=3, units="mm", read_only=True, doc="sample-detector distance")

    @pixel_size.startup
    async def pixel_size(self, instance: Any, async_lib: Any) -> None:
        model = self.parent.world.xray
        await self.pixel_size.write(float(model.pixel_size_um))
        await self.energy.write(float(model.energy_keV))
        await self.distance.write(float(model.propagation_distance_mm))


class XrayDetectorIOC(AreaDetectorIOC):
    """The tomography camera (uint16 frames) of the simulated beamline.

    Parameters
    ----------
    simulation
        Physics of the simulated world (seed, detector shape, pixel size, flux, axis offset).
    stage_prefix
        Prefix of the stage's motor records (``<prefix>rot``, ``<prefix>x``, ...); ``""`` for a
        fixed geometry.
    shutter_pv, temperature_pv, current_pv
        Shutter state (``"open"``/``"closed"``), furnace temperature (K) and ring current (mA)
        PVs; ``""`` for open, ambient and nominal.
    nominal_current_mA
        Ring current at which the detector sees the full flux of the model.
    """

    frame_dtype = np.dtype(np.uint16)
    attribute_names = (
        "RotationAngle",
        "RotationAngleStart",
        "RotationAngleEnd",
        "SampleX",
        "SampleY",
        "SampleZ",
        "ShutterOpen",
        "SampleTemperature",
        "RingCurrent",
        "AcquireTime",
        "TimeStamp",
        "UniqueId",
    )

    sim = SubGroup(SimControl, prefix="sim:")
    optics = SubGroup(OpticsGroup, prefix="optics:")

    def __init__(
        self,
        *args: Any,
        simulation: SimulationSettings,
        stage_prefix: str = "",
        shutter_pv: str = "",
        temperature_pv: str = "",
        current_pv: str = "",
        nominal_current_mA: float = NOMINAL_CURRENT_MA,
        **kwargs: Any,
    ) -> None:
        self.world = SimulatedWorld(simulation)
        self.frame_shape = tuple(self.world.xray.shape_px)
        super().__init__(*args, **kwargs)
        if not (math.isfinite(nominal_current_mA) and nominal_current_mA > 0):
            raise ValueError(f"nominal_current_mA must be > 0, got {nominal_current_mA}")
        self.nominal_current_mA = float(nominal_current_mA)
        axes = {"angle": "rot", "x": "x", "y": "y", "z": "z"}
        self.remote = RemoteState(
            {
                **{key: f"{stage_prefix}{axis}.RBV" if stage_prefix else "" for key, axis in axes.items()},
                "shutter": shutter_pv,
                "temperature": temperature_pv,
                "current": current_pv,
            }
        )
        self._phantoms: OrderedDict[int, Phantom] = OrderedDict()
        self._phantom_lock = threading.Lock()

    async def exposure_inputs(self) -> dict[str, float]:
        values = await self.remote.read()
        shutter = values.get("shutter", "open")
        return {
            "angle_deg": float(values.get("angle", 0.0)),
            "x_um": float(values.get("x", 0.0)),
            "y_um": float(values.get("y", 0.0)),
            "z_um": float(values.get("z", 0.0)),
            "shutter_open": 1.0 if shutter in ("open", 1) else 0.0,
            "temperature_K": float(values.get("temperature", AMBIENT_K)),
            "current_mA": float(values.get("current", self.nominal_current_mA)),
        }

    def phantom_at(self, temperature_K: float) -> Phantom:
        """The sample at ``temperature_K`` rounded to 1 K (cached, as :meth:`SimulatedWorld.phantom`)."""
        key = int(round(temperature_K))
        with self._phantom_lock:
            if key not in self._phantoms:
                self._phantoms[key] = make_phantom(
                    seed=self.world.seed, temperature_K=float(key), section_z_um=self.world.section_z_um
                )
                if len(self._phantoms) > 64:
                    self._phantoms.popitem(last=False)
            return self._phantoms[key]

    def compute_frame(self, start: Mapping[str, float], end: Mapping[str, float], exposure_s: float) -> tuple[np.ndarray, dict[str, float]]:
        mid = {key: 0.5 * (start[key] + end[key]) for key in ("angle_deg", "x_um", "y_um", "z_um", "temperature_K", "current_mA")}
        beam_on = bool(start["shutter_open"] and end["shutter_open"]) and mid["current_mA"] > 0
        model = self.world.xray
        if beam_on:
            model = dataclasses.replace(
                model, incident_photons_per_s=model.incident_photons_per_s * mid["current_mA"] / self.nominal_current_mA
            )
        frame = xray_frame(
            self.phantom_at(mid["temperature_K"]),
            model,
            angle_deg=mid["angle_deg"],
            x_um=mid["x_um"],
            y_um=mid["y_um"],
            z_um=mid["z_um"],
            exposure_s=exposure_s,
            shutter_open=beam_on,
            rng=self.world.rng,
        )
        attributes = {
            "RotationAngle": mid["angle_deg"],
            "RotationAngleStart": start["angle_deg"],
            "RotationAngleEnd": end["angle_deg"],
            "SampleX": mid["x_um"],
            "SampleY": mid["y_um"],
            "SampleZ": mid["z_um"],
            "ShutterOpen": 1.0 if beam_on else 0.0,
            "SampleTemperature": mid["temperature_K"],
            "RingCurrent": mid["current_mA"],
        }
        return frame, attributes


def main(argv: list[str] | None = None) -> None:
    """``python -m corrflow.simulators.ioc xray-detector --prefix P [--stage-prefix S] ...``."""
    parser = ioc_argument_parser("Simulated tomography camera (areaDetector-like, HDF5 plugin).", default_section="det:")
    parser.add_argument("--stage-prefix", default="", help="prefix of the rotation/x/y/z motor records, e.g. 'CF:BL:stage:'")
    parser.add_argument("--shutter-pv", default="", help="shutter state PV")
    parser.add_argument("--temperature-pv", default="", help="furnace temperature PV (K)")
    parser.add_argument("--current-pv", default="", help="ring current PV (mA)")
    parser.add_argument("--nominal-current", type=float, default=NOMINAL_CURRENT_MA, help="ring current of full flux (mA)")
    parser.add_argument("--simulation", default=None, help="JSON of corrflow's simulation settings (default: from corrflow settings)")
    args = parser.parse_args(argv)
    group = XrayDetectorIOC(
        prefix=args.prefix + args.section,
        simulation=simulation_settings(args.simulation),
        stage_prefix=args.stage_prefix,
        shutter_pv=args.shutter_pv,
        temperature_pv=args.temperature_pv,
        current_pv=args.current_pv,
        nominal_current_mA=args.nominal_current,
    )
    serve(group, port=args.port, list_pvs=args.list_pvs, verbose=args.verbose)


def simulation_settings(text: str | None) -> SimulationSettings:
    """Simulation settings from JSON, or those of corrflow's settings (env / config file)."""
    if text:
        return SimulationSettings.model_validate_json(text)
    from corrflow.config.settings import load_settings

    return load_settings().simulation
