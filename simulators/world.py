"""The simulated facility: one sample, one heater, one clock, shared by every simulated device."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from corrflow.processing.transforms import similarity
from corrflow.config.settings import SimulationSettings
from corrflow.simulators.heater import HeaterModel
from corrflow.simulators.microscope import MicroscopeModel
from corrflow.simulators.phantom import Phantom, make_phantom
from corrflow.simulators.xray import XrayDetectorModel

__all__ = ["SimulatedWorld", "true_sample_from_microscope"]

_PHANTOM_CACHE_SIZE = 64


def true_sample_from_microscope(*, seed: int, section_z_um: float) -> np.ndarray:
    """The ground-truth ``sample_from_microscope`` similarity for a seed, shape (4, 4), float64.

    Scale 1.015-1.025, rotation 10-14 deg, shift x 30-40 um and y -25 to -15 um, drawn from ``seed``;
    its z translation is the section height ``section_z_um``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4242]))
    return similarity(
        scale=float(1.02 + rng.uniform(-0.005, 0.005)),
        rotation_deg=float(12.0 + rng.uniform(-2.0, 2.0)),
        translation_um=(float(35.0 + rng.uniform(-5, 5)), float(-20.0 + rng.uniform(-5, 5)), float(section_z_um)),
    )


class SimulatedWorld:
    """One simulated facility: one sample, one heater, one clock, shared by all simulated devices.

    Parameters
    ----------
    simulation
        The ``Settings.simulation`` section.
    section_z_um
        Height (sample frame, um) of the plane the microscope images, where the fiducials are centred.
    clock
        Wall-clock source in seconds (``time.monotonic``); tests inject a fake one.

    Attributes
    ----------
    sample_from_microscope
        TRUE 4x4 ``microscope_stage`` -> ``beamline_sample`` transform (ground truth for registration).
    section_z_um
        Height of the sectioned plane (um).
    xray, microscope, heater
        The instrument models.
    rng
        Noise generator shared by the devices (numpy generators serialise their own calls).

    Notes
    -----
    Simulated time is ``time_scale * (wall seconds since creation)``. The heater is stepped lazily up to
    the current simulated time under a lock whenever the temperature is read or the setpoint changed, so
    ophyd threads may call in concurrently. Change the setpoint through :meth:`set_heater_setpoint` (or
    call :meth:`advance_to_now` first) so the elapsed time is integrated with the old setpoint.
    """

    def __init__(
        self,
        simulation: SimulationSettings,
        *,
        section_z_um: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not math.isfinite(section_z_um):
            raise ValueError(f"section_z_um must be finite, got {section_z_um}")
        self.simulation = simulation
        self.seed = int(simulation.seed)
        self.section_z_um = float(section_z_um)
        self.time_scale = float(simulation.time_scale)
        self._clock = clock
        self._t0_wall_s = clock()
        self._heater_time_s = 0.0
        self._lock = threading.RLock()
        self._phantoms: OrderedDict[int, Phantom] = OrderedDict()

        self.sample_from_microscope = true_sample_from_microscope(seed=self.seed, section_z_um=self.section_z_um)
        self.xray = XrayDetectorModel(
            shape_px=tuple(simulation.xray_detector_shape_px),
            pixel_size_um=simulation.xray_pixel_size_um,
            incident_photons_per_s=simulation.incident_photons,
            rotation_axis_offset_px=simulation.rotation_axis_offset_px,
            seed=self.seed,
        )
        self.microscope = MicroscopeModel(
            shape_px=tuple(simulation.microscope_image_shape_px),
            pixel_size_um=simulation.microscope_pixel_size_um,
            sample_from_microscope=self.sample_from_microscope,
            seed=self.seed,
        )
        self.heater = HeaterModel()
        # Detector noise and sensor noise draw from separate streams: how often a heater is polled
        # depends on thread timing, and must not change the frames a seeded dry-run produces.
        self.rng = np.random.default_rng(np.random.SeedSequence([self.seed, 99]))
        self._sensor_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 101]))
        # Build (and cache) the room-temperature sample now: an invalid layout fails at start-up.
        self.phantom()

    # -- clock --------------------------------------------------------------------------------------
    def now_s(self) -> float:
        """Simulated seconds since creation: ``time_scale * wall seconds``."""
        return self.time_scale * (self._clock() - self._t0_wall_s)

    def wall_seconds(self, simulated_s: float) -> float:
        """Wall-clock seconds that ``simulated_s`` simulated seconds take (for devices that sleep)."""
        return simulated_s / self.time_scale

    def advance_to_now(self) -> None:
        """Step the heater model up to :meth:`now_s`."""
        with self._lock:
            now = self.now_s()
            if now > self._heater_time_s:
                self.heater.advance(now - self._heater_time_s)
                self._heater_time_s = now

    # -- heater -------------------------------------------------------------------------------------
    def set_heater_setpoint(self, setpoint_K: float) -> None:
        """Integrate up to now with the old setpoint, then change it (``ValueError`` if out of range)."""
        with self._lock:
            self.advance_to_now()
            self.heater.set_setpoint(setpoint_K)

    def disturb_heater(self, delta_K: float) -> None:
        """Integrate up to now, then add ``delta_K`` to the true sample temperature (a disturbance, K)."""
        with self._lock:
            self.advance_to_now()
            self.heater.disturb(delta_K)

    def sample_temperature_K(self) -> float:
        """True sample temperature now (K)."""
        with self._lock:
            self.advance_to_now()
            return float(self.heater.temperature_K)

    def measure_temperature_K(self) -> float:
        """Thermocouple reading now: true temperature plus sensor noise (K)."""
        with self._lock:
            self.advance_to_now()
            return self.heater.measure(self._sensor_rng)

    # -- sample -------------------------------------------------------------------------------------
    def phantom(self) -> Phantom:
        """The sample at the current temperature, rounded to (and cached per) 1 K."""
        temperature_K = int(round(self.sample_temperature_K()))
        with self._lock:
            cached = self._phantoms.get(temperature_K)
            if cached is not None:
                self._phantoms.move_to_end(temperature_K)
                return cached
            phantom = make_phantom(seed=self.seed, temperature_K=float(temperature_K), section_z_um=self.section_z_um)
            self._phantoms[temperature_K] = phantom
            if len(self._phantoms) > _PHANTOM_CACHE_SIZE:
                self._phantoms.popitem(last=False)
            return phantom
