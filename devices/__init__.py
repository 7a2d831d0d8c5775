"""Ophyd devices of the instruments, declared once; built by the factory of each instrument.

- :mod:`.beamline`: :func:`~corrflow.devices.beamline.build_beamline` (sample stage, X-ray
  detector, shutter, heater);
- :mod:`.sem`: :func:`~corrflow.devices.sem.build_microscope` (stage, electron detector).

No device is built at import. In ``"sim"`` mode the devices act on a
:class:`~corrflow.simulators.world.SimulatedWorld`; the physics lives in :mod:`corrflow.simulators`.
"""
