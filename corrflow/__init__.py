"""corrflow: correlative beamline + microscope workflows."""
__version__ = "0.1.0"
