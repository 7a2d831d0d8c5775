"""The electron microscope IOC: stage (two motor records) and backscatter detector in one process.

Each frame is :func:`corrflow.simulators.microscope_image` of the phantom's sectioned plane at
the stage's x, y at the middle of the exposure (float32, electrons per pixel over the beam dose).

PVs (prefix ``<instrument>``, e.g. ``CF:SEM:``): ``stage:x``, ``stage:y`` (motor records, um),
``det:cam1:...``, ``det:HDF1:...`` (see :mod:`.area_detector`), ``det:optics:PixelSize_RBV`` (um in
the ``microscope_stage`` frame), ``sim:PutCount``. NDAttributes per frame: ``StageX``, ``StageY``
(um), ``AcquireTime``, ``TimeStamp``, ``UniqueId``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from caproto.server import PVGroup, SubGroup, pvproperty

from corrflow.config.settings import SimulationSettings
from corrflow.simulators.ioc.area_detector import AreaDetectorIOC
from corrflow.simulators.ioc.common import SimControl, ioc_argument_parser, serve
from corrflow.simulators.ioc.motor import MicroscopeStageMotors, alias_record_names, scale_velocities
from corrflow.simulators.ioc.xray_detector import simulation_settings
from corrflow.simulators.microscope import microscope_image
from corrflow.simulators.world import SimulatedWorld

__all__ = ["MicroscopeIOC", "main"]


class MicroscopeOptics(PVGroup):
    """Pixel size of the microscope images (prefix ``<detector>optics:``)."""

    pixel_size = pvproperty(name="PixelSize_RBV", value=1.0, precision=4, units="um", read_only=True)

    @pixel_size.startup
    async def pixel_size(self, instance: Any, async_lib: Any) -> None:
        await self.pixel_size.write(float(self.parent.world.microscope.pixel_size_um))


class MicroscopeDetectorGroup(AreaDetectorIOC):
    """Backscattered-electron detector imaging the stage position of the parent IOC."""

    frame_dtype = np.dtype(np.float32)
    attribute_names = ("StageX", "StageY", "AcquireTime", "TimeStamp", "UniqueId")

    optics = SubGroup(MicroscopeOptics, prefix="optics:")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.world: SimulatedWorld = self.parent.world
        self.frame_shape = tuple(self.world.microscope.shape_px)

    async def exposure_inputs(self) -> dict[str, float]:
        stage = self.parent.stage
        return {"stage_x_um": float(stage.x.rbv.value), "stage_y_um": float(stage.y.rbv.value)}

    def compute_frame(self, start: Mapping[str, float], end: Mapping[str, float], exposure_s: float) -> tuple[np.ndarray, dict[str, float]]:
        x = 0.5 * (start["stage_x_um"] + end["stage_x_um"])
        y = 0.5 * (start["stage_y_um"] + end["stage_y_um"])
        world = self.world
        frame = microscope_image(world.phantom(), world.microscope, stage_x_um=x, stage_y_um=y, rng=world.rng)
        return frame.astype(np.float32, copy=False), {"StageX": x, "StageY": y}


class MicroscopeIOC(PVGroup):
    """Microscope stage and detector sharing one simulated sample (at ambient temperature).

    Parameters
    ----------
    simulation
        Physics of the simulated world (seed, image shape, pixel size, true transform).
    """

    sim = SubGroup(SimControl, prefix="sim:")
    stage = SubGroup(MicroscopeStageMotors, prefix="stage:")
    det = SubGroup(MicroscopeDetectorGroup, prefix="det:")

    def __init__(self, *args: Any, simulation: SimulationSettings, **kwargs: Any) -> None:
        # Set before the sub-groups are built: the detector takes the world from its parent.
        self.world = SimulatedWorld(simulation)
        super().__init__(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python -m corrflow.simulators.ioc microscope --prefix M [--speed S] [--port N]``."""
    parser = ioc_argument_parser("Simulated electron microscope: stage and detector.", default_section="")
    parser.add_argument("--speed", type=float, default=1.0, help="velocity factor over the nominal stage velocities")
    parser.add_argument("--simulation", default=None, help="JSON of corrflow's simulation settings (default: from corrflow settings)")
    args = parser.parse_args(argv)
    group = MicroscopeIOC(prefix=args.prefix + args.section, simulation=simulation_settings(args.simulation))
    scale_velocities(group, args.speed)
    alias_record_names(group)
    serve(group, port=args.port, list_pvs=args.list_pvs, verbose=args.verbose)
