"""The simulated electron microscope detector: backscatter images of the sectioned sample plane.

Each image is computed by :func:`corrflow.simulators.microscope_image` at the microscope stage's
position at the start of the frame, in the ``microscope_stage`` frame (pixel ``(r, c)`` images
``(x + (c - (cols-1)/2) * px, y + (r - (rows-1)/2) * px)``). Images are float32 (detected
electrons per pixel over ``electrons_per_px``), written to HDF5 as stream assets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ophyd import Component as Cpt

from corrflow.devices.clock import SimClock
from corrflow.devices.hdf5_stream import StreamingDetector
from corrflow.devices.signals import ReadbackSignal
from corrflow.devices.stage import MicroscopeStage
from corrflow.simulators import microscope_image
from corrflow.simulators.world import SimulatedWorld

__all__ = ["MicroscopeDetector"]


class MicroscopeDetector(StreamingDetector):
    """Simulated backscattered-electron detector (float32 frames).

    Parameters
    ----------
    name
        Device name; the image data key is ``{name}_image``.
    world
        The simulated world (sample, microscope model, noise generator).
    stage
        The microscope stage whose x, y position is imaged at the image centre.
    data_dir
        Directory for the HDF5 files.
    clock
        Simulated clock (default: the world's).

    Notes
    -----
    Components: ``frame_number`` (normal), ``exposure_s`` (config, frame time, s), ``shape_px``
    (config), ``pixel_size_um`` (config, um in the ``microscope_stage`` frame).
    """

    frame_dtype: ClassVar[np.dtype] = np.dtype(np.float32)
    frame_attribute_keys: ClassVar[dict[str, tuple[str, str]]] = {"stage_x": ("StageX", "um"), "stage_y": ("StageY", "um")}

    pixel_size_um = Cpt(ReadbackSignal, value=0.0, kind="config", units="um")

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        world: SimulatedWorld,
        stage: MicroscopeStage,
        data_dir: Path | str,
        clock: SimClock | None = None,
        **kwargs: Any,
    ) -> None:
        model = world.microscope
        super().__init__(
            prefix=prefix,
            name=name,
            data_dir=data_dir,
            clock=clock if clock is not None else SimClock.of_world(world),
            frame_shape_px=model.shape_px,
            **kwargs,
        )
        self._world = world
        self._stage = stage
        self.pixel_size_um.put(float(model.pixel_size_um), internal=True)

    def _exposure_inputs(self) -> dict[str, Any]:
        return {"stage_x_um": float(self._stage.x.position), "stage_y_um": float(self._stage.y.position)}

    def _exposure_inputs_at(self, time_s: float) -> dict[str, Any]:
        return {"stage_x_um": float(self._stage.x.position_at(time_s)), "stage_y_um": float(self._stage.y.position_at(time_s))}

    def _frame_inputs(self, start: dict[str, Any], end: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        inputs = {key: 0.5 * (start[key] + end[key]) for key in ("stage_x_um", "stage_y_um")}
        return inputs, {"StageX": inputs["stage_x_um"], "StageY": inputs["stage_y_um"]}

    def _acquire_frame(self, *, exposure_s: float, inputs: dict[str, Any]) -> np.ndarray:
        world = self._world
        return microscope_image(world.phantom(), world.microscope, rng=world.rng, **inputs)
