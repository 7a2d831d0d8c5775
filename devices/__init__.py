"""Ophyd devices of the instruments, declared once; built by the factory of each instrument.

- :mod:`.beamline`: :func:`~corrflow.devices.beamline.build_beamline` (sample stage, X-ray
  detector, shutter, heater; ring current in EPICS mode);
- :mod:`.sem`: :func:`~corrflow.devices.sem.build_microscope` (stage, electron detector).

One setting per instrument (``settings.beamline.mode`` / ``settings.microscope.mode``) picks the
implementation of the same interfaces: ``"sim"`` builds the simulated devices (:mod:`.stage`,
:mod:`.detectors`, :mod:`.heater`, :mod:`.shutter`, :mod:`.microscope`) acting on a
:class:`~corrflow.simulators.world.SimulatedWorld`; ``"epics"`` builds the EPICS devices under the
instrument's ``epics_prefix`` (:mod:`.epics_stage` motor records, :mod:`.epics_detector`
areaDetector cam + HDF5 plugin, :mod:`.epics_heater`, :mod:`.epics_source` shutter and ring
current; building blocks with timeouts in :mod:`.epics_base`). :mod:`.kinds` lists which classes
fill each role. No device is built at import.
"""
