"""The device classes that can fill each role of an instrument, simulated or EPICS.

Plans check their arguments against these tuples (``isinstance(stage, SAMPLE_STAGE_TYPES)``), so
the same plan runs on the simulated devices and on the EPICS devices built by the factories.
"""

from __future__ import annotations

from corrflow.devices.detectors import XrayDetector
from corrflow.devices.epics_detector import EpicsAreaDetector, EpicsMicroscopeDetector, EpicsXrayDetector
from corrflow.devices.epics_heater import EpicsHeater
from corrflow.devices.epics_source import BeamMonitor, EpicsShutter
from corrflow.devices.epics_stage import EpicsMicroscopeStage, EpicsSampleStage
from corrflow.devices.hdf5_stream import StreamingDetector
from corrflow.devices.heater import Heater
from corrflow.devices.microscope import MicroscopeDetector
from corrflow.devices.shutter import Shutter
from corrflow.devices.stage import MicroscopeStage, SampleStage

__all__ = [
    "AREA_DETECTOR_TYPES",
    "BEAM_MONITOR_TYPES",
    "HEATER_TYPES",
    "MICROSCOPE_DETECTOR_TYPES",
    "MICROSCOPE_STAGE_TYPES",
    "SAMPLE_STAGE_TYPES",
    "SHUTTER_TYPES",
    "XRAY_DETECTOR_TYPES",
]

SAMPLE_STAGE_TYPES = (SampleStage, EpicsSampleStage)
XRAY_DETECTOR_TYPES = (XrayDetector, EpicsXrayDetector)
SHUTTER_TYPES = (Shutter, EpicsShutter)
HEATER_TYPES = (Heater, EpicsHeater)
BEAM_MONITOR_TYPES = (BeamMonitor,)
MICROSCOPE_STAGE_TYPES = (MicroscopeStage, EpicsMicroscopeStage)
MICROSCOPE_DETECTOR_TYPES = (MicroscopeDetector, EpicsMicroscopeDetector)
AREA_DETECTOR_TYPES = (StreamingDetector, EpicsAreaDetector)
