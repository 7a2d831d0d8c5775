"""Typed flow parameters and results.

These pydantic models are the flows' parameters, so Prefect's UI builds its run forms from them:
every field has a description and its unit in its name. They validate before anything moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sample(_Model):
    """Who and what: the identification group of every run's metadata."""

    name: str = Field(
        "sim-sample-01",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Sample name (letters, digits, '_', '.', '-'); used in file and flow-run names",
    )
    proposal: str = Field("sim-0001", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Proposal / experiment id")
    user: str = Field("local-user", min_length=1, max_length=64, description="Person responsible for the run")
    description: str = Field("", max_length=500, description="Free text about the sample")


class TomographyParameters(_Model):
    """Settings of a step-scan tomography (0-180 degrees by default; 360 and offset centre optional)."""

    num_projections: int = Field(
        180, ge=2, le=20000,
        description="Projections in all, equally spaced over [start_deg, stop_deg); a full turn needs twice as many for the same step",
    )
    start_deg: float = Field(0.0, description="First rotation angle (deg)")
    stop_deg: float | None = Field(
        None, description="End of the angular range (deg), not itself measured; empty = start_deg + rotation_range_deg"
    )
    rotation_range_deg: Literal[180.0, 360.0] | None = Field(
        None, description="180 (half turn, default) or 360 (full turn, needed for an axis offset); or give stop_deg"
    )
    axis_offset_um: float = Field(
        0.0,
        description="Offset centre / half acquisition (um): stage x shift for the projections that puts the rotation "
        "axis near a detector edge, widening the field of view; needs rotation_range_deg=360; 0 = centred",
    )
    exposure_s: float = Field(0.05, gt=0, le=60, description="Exposure per frame (s)")
    num_darks: int = Field(5, ge=1, le=1000, description="Dark frames (shutter closed) before the projections")
    num_flats: int = Field(10, ge=1, le=1000, description="Flat frames (sample out of the beam)")
    flat_offset_x_um: float = Field(2000.0, description="Sample x move to take it out of the beam for flats (um)")


class MicrographParameters(_Model):
    """Where the microscope images the sectioned sample, in the microscope stage frame."""

    stage_x_um: float = Field(0.0, description="Microscope stage x at the image centre (um)")
    stage_y_um: float = Field(0.0, description="Microscope stage y at the image centre (um)")
    section_z_um: float = Field(
        20.0, description="Nominal height of the sectioned plane in the sample frame (um); refined by registration"
    )


class ReconstructionParameters(_Model):
    """Filtered back-projection settings."""

    filter_name: Literal["ramp", "shepp-logan", "cosine", "hann"] = Field(
        "shepp-logan", description="FBP filter"
    )
    center_px: float | None = Field(
        None, description="Rotation-axis column (0-based, px); empty = found automatically from the data"
    )
    chunk_rows: int = Field(8, ge=1, le=4096, description="Detector rows reconstructed per chunk (bounds memory)")


class AcquisitionResult(_Model):
    run_uid: str
    instrument: str
    files: tuple[Path, ...] = Field(description="Raw files written (detector HDF5 and NeXus)")
    nexus_path: Path | None = None


class TransferResult(_Model):
    destination_root: Path
    files: tuple[Path, ...]
    manifest_path: Path
    total_bytes: int
    seconds: float


class ReconstructionResult(_Model):
    volume_path: Path
    center_px: float
    voxel_size_um: float
    shape_zyx: tuple[int, int, int]
    seconds: float


class RegistrationSummary(_Model):
    sample_from_microscope: list[list[float]]
    scale: float
    rotation_deg: float
    translation_um: tuple[float, float, float]
    rms_residual_um: float
    n_matches: int
    slice_index: int
    section_z_um: float
    matched_fiducials_um: list[tuple[float, float]] = Field(
        default_factory=list, description="Matched fiducial centres in the sample frame (x, y), um"
    )
