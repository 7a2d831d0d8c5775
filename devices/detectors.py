"""The simulated tomography detector: Beer-Lambert frames of the world's sample, written to HDF5.

Each frame is computed by :func:`corrflow.simulators.xray_frame` from the sample at its current
temperature, the rotation stage's angle and translations, the exposure time and the shutter
state at the start of the exposure. Frames go to HDF5 and reach the documents as stream assets
(see :mod:`corrflow.devices.hdf5_stream`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ophyd import Component as Cpt

from corrflow.devices.clock import SimClock
from corrflow.devices.hdf5_stream import StreamingDetector
from corrflow.devices.shutter import Shutter
from corrflow.devices.signals import ConfigSignal, ReadbackSignal
from corrflow.formats.nexus import IMAGE_KEY_DARK, IMAGE_KEY_FLAT, IMAGE_KEY_PROJECTION
from corrflow.devices.stage import SampleStage
from corrflow.simulators import xray_frame
from corrflow.simulators.world import SimulatedWorld

__all__ = ["XrayDetector", "IMAGE_KEY_PROJECTION", "IMAGE_KEY_FLAT", "IMAGE_KEY_DARK", "IMAGE_KEYS"]

# NXtomo image_key values (defined once, with the NXtomo format in corrflow.formats.nexus).
IMAGE_KEYS = (IMAGE_KEY_PROJECTION, IMAGE_KEY_FLAT, IMAGE_KEY_DARK)


def _check_image_key(value: Any) -> None:
    if isinstance(value, bool) or value not in IMAGE_KEYS:
        raise ValueError(f"image_key must be one of {IMAGE_KEYS} (0 projection, 1 flat, 2 dark), got {value!r}")


class XrayDetector(StreamingDetector):
    """Simulated scintillator + camera of the tomography beamline (uint16 frames).

    Parameters
    ----------
    name
        Device name; the image data key is ``{name}_image``.
    world
        The simulated world (sample, detector model, noise generator).
    stage
        The sample stage whose rotation and translations set the projection geometry.
    shutter
        The beam shutter; closed gives dark frames.
    data_dir
        Directory for the HDF5 files.
    clock
        Simulated clock (default: the world's).

    Notes
    -----
    Components: ``frame_number`` (normal), ``image_key`` (normal, NXtomo: 0 projection, 1 flat,
    2 dark; plans set it per stream), ``saturated_px`` (normal, pixels at the uint16 maximum in
    the last frame), ``exposure_s`` (config, s), ``shape_px`` (config, rows and
    columns), ``pixel_size_um`` (config, um at the sample), ``energy_keV`` (config, keV),
    ``distance_mm`` (config, sample-detector distance, mm). The column of the rotation axis is
    deliberately not a component: the instrument does not know it; reconstruction finds it.
    """

    frame_dtype: ClassVar[np.dtype] = np.dtype(np.uint16)
    frame_attribute_keys: ClassVar[dict[str, tuple[str, str]]] = {
        "rotation_angle": ("RotationAngle", "deg"),
        "x_translation": ("SampleX", "um"),
        "y_translation": ("SampleY", "um"),
        "z_translation": ("SampleZ", "um"),
        "shutter_open": ("ShutterOpen", ""),
        "temperature": ("SampleTemperature", "K"),
        "timestamp": ("TimeStamp", "s"),
    }
    # Each projection's event carries the angle of its own exposure, as the camera recorded it.
    step_attribute_suffixes: ClassVar[tuple[str, ...]] = ("rotation_angle",)

    image_key = Cpt(ConfigSignal, value=IMAGE_KEY_PROJECTION, kind="normal", check=_check_image_key)
    saturated_px = Cpt(ReadbackSignal, value=0, kind="normal", units="px")
    pixel_size_um = Cpt(ReadbackSignal, value=0.0, kind="config", units="um")
    energy_keV = Cpt(ReadbackSignal, value=0.0, kind="config", units="keV")
    distance_mm = Cpt(ReadbackSignal, value=0.0, kind="config", units="mm")

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        world: SimulatedWorld,
        stage: SampleStage,
        shutter: Shutter,
        data_dir: Path | str,
        clock: SimClock | None = None,
        **kwargs: Any,
    ) -> None:
        model = world.xray
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
        self._shutter = shutter
        self.pixel_size_um.put(float(model.pixel_size_um), internal=True)
        self.energy_keV.put(float(model.energy_keV), internal=True)
        self.distance_mm.put(float(model.propagation_distance_mm), internal=True)

    def _exposure_inputs(self) -> dict[str, Any]:
        stage = self._stage
        return {
            "angle_deg": float(stage.rotation.position),
            "x_um": float(stage.x.position),
            "y_um": float(stage.y.position),
            "z_um": float(stage.z.position),
            "shutter_open": self._shutter.is_open,
        }

    def _exposure_inputs_at(self, time_s: float) -> dict[str, Any]:
        stage = self._stage
        return {
            "angle_deg": float(stage.rotation.position_at(time_s)),
            "x_um": float(stage.x.position_at(time_s)),
            "y_um": float(stage.y.position_at(time_s)),
            "z_um": float(stage.z.position_at(time_s)),
            "shutter_open": self._shutter.is_open,
        }

    def _frame_inputs(self, start: dict[str, Any], end: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        # A frame taken while the stage moves integrates over the path; it is simulated at the
        # middle of the exposure, and that geometry is what the frame's attributes record.
        inputs = {key: 0.5 * (start[key] + end[key]) for key in ("angle_deg", "x_um", "y_um", "z_um")}
        inputs["shutter_open"] = bool(start["shutter_open"] and end["shutter_open"])
        attributes = {
            "RotationAngle": inputs["angle_deg"],
            "RotationAngleStart": start["angle_deg"],
            "RotationAngleEnd": end["angle_deg"],
            "SampleX": inputs["x_um"],
            "SampleY": inputs["y_um"],
            "SampleZ": inputs["z_um"],
            "ShutterOpen": 1.0 if inputs["shutter_open"] else 0.0,
            "SampleTemperature": self._world.measure_temperature_K(),
        }
        return inputs, attributes

    def _acquire_frame(self, *, exposure_s: float, inputs: dict[str, Any]) -> np.ndarray:
        world = self._world
        frame = xray_frame(world.phantom(), world.xray, exposure_s=exposure_s, rng=world.rng, **inputs)
        # Saturated pixels carry no attenuation information; count them so QA can flag the frame.
        self.saturated_px.put(int(np.count_nonzero(frame == np.iinfo(self.frame_dtype).max)), internal=True)
        return frame
