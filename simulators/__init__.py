"""Physics-based simulators of the correlative experiment (importable without bluesky or ophyd).

- :mod:`.phantom`: an analytic AlSi10Mg sample with pores that grow above 400 K, Fe-rich precipitates,
  a Si phase that appears above 550 K and Cu fiducials; exact X-ray line integrals from analytic chords.
- :mod:`.xray`: parallel-beam Beer-Lambert frames with optional Fresnel propagation, beam profile, pixel
  gain, Poisson and read noise.
- :mod:`.heater`: furnace with first-order lag, ramp-rate limit and sensor noise.
- :mod:`.microscope`: backscatter-like SEM image of the sectioned plane in the microscope stage frame.
- :mod:`.world`: :class:`SimulatedWorld`, the shared sample, heater, clock and true transforms.
- :mod:`.ioc`: the same physics served as caproto EPICS IOCs (stage, detector, furnace, source,
  microscope) on 127.0.0.1; ``python -m corrflow.simulators.ioc NAME --prefix P``.
"""

from corrflow.simulators.heater import HeaterModel
from corrflow.simulators.microscope import MicroscopeModel, microscope_image, microscope_pixel_points_um
from corrflow.simulators.phantom import (
    KINDS,
    MATERIAL_CODES,
    MATERIALS,
    PHASE_ONSET_K,
    PORE_GROWTH_ONSET_K,
    Feature,
    Material,
    Phantom,
    make_phantom,
    phase_radius_fraction,
    pore_growth_factor,
    refractive_decrement,
)
from corrflow.simulators.world import SimulatedWorld, true_sample_from_microscope
from corrflow.simulators.xray import XrayDetectorModel, fresnel_propagate, xray_frame, xray_transmission

__all__ = [
    "KINDS",
    "MATERIALS",
    "MATERIAL_CODES",
    "PHASE_ONSET_K",
    "PORE_GROWTH_ONSET_K",
    "Feature",
    "HeaterModel",
    "Material",
    "MicroscopeModel",
    "Phantom",
    "SimulatedWorld",
    "XrayDetectorModel",
    "fresnel_propagate",
    "make_phantom",
    "microscope_image",
    "microscope_pixel_points_um",
    "phase_radius_fraction",
    "pore_growth_factor",
    "refractive_decrement",
    "true_sample_from_microscope",
    "xray_frame",
    "xray_transmission",
]
