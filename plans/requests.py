"""One request model per plan: the arguments a user gives, their units, bounds and cross-field rules.

Each model is the single definition of what its plan accepts. The plan builds it when called
(:meth:`PlanRequest.build`, which touches no hardware), ``corrflow dry-run`` parses its command line
into it, and the flows take it as a parameter, so Prefect's run forms and the server's parameter
check come from its JSON schema. A cross-field rule is written twice in one place: as a model
validator (Python callers) and as a JSON-schema ``if``/``then`` in the same model (the Prefect server
refuses a run whose parameters break it, before a flow run exists); ``tests/test_plan_requests.py``
checks that the two agree.

What depends on the instrument (soft limits along the whole trajectory, free space for the frames,
the detector's field of view, the rotation speed) is not here: the plans check it in a preflight
step that reads the instrument through the RunEngine before the first motion
(:mod:`corrflow.plans.preflight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, WithJsonSchema, field_validator, model_validator

from corrflow.processing.roi import RegionOfInterest
from corrflow.processing.transforms import invert

__all__ = [
    "AlignRotationAxisRequest",
    "MAX_EXPOSURE_S",
    "MAX_PROJECTIONS",
    "MAX_REFERENCE_FRAMES",
    "MAX_TILES",
    "MicrographMosaicRequest",
    "MicrographRequest",
    "PlanRequest",
    "PlanValidationError",
    "RelocateRoiRequest",
    "TomoFlyScanRequest",
    "TomoScanRequest",
    "XrayMosaicRequest",
    "stage_target_um",
]

MAX_EXPOSURE_S = 3600.0
MAX_PROJECTIONS = 100_000
MAX_REFERENCE_FRAMES = 10_000
MAX_TILES = 10_000


class PlanValidationError(ValueError):
    """Plan arguments are wrong; ``problems`` lists each one, naming the argument."""

    def __init__(self, plan_name: str, problems: Sequence[str]) -> None:
        self.plan_name = plan_name
        self.problems = tuple(problems)
        super().__init__(f"{plan_name}: invalid arguments:\n" + "\n".join(f"  - {p}" for p in self.problems))


def problems_of(error: ValidationError, *, prefix: str = "") -> list[str]:
    """One line per pydantic error, naming the argument and the value given."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if field:
            lines.append(f"{prefix}{field}: {message} (got {item.get('input')!r})")
        else:  # a cross-field rule: its message names the fields
            lines.append(f"{prefix}{message}")
    return lines


class PlanRequest(BaseModel):
    """Base of the request models: frozen, no unknown fields, no NaN or infinity, and numbers only as
    numbers (strict fields: ``"0.1"`` or ``True`` is refused, as a JSON-schema ``number`` refuses it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    plan_name: ClassVar[str]

    @classmethod
    def build(cls, **values: Any) -> Self:
        """The request, or :class:`PlanValidationError` listing every problem (no hardware touched)."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise PlanValidationError(cls.plan_name, problems_of(exc)) from None


_OFFSET_NEEDS_FULL_TURN = {
    # JSON Schema numbers compare by value, so 0.0 is the const 0.
    "if": {"properties": {"axis_offset_um": {"not": {"const": 0}}}, "required": ["axis_offset_um"]},
    "then": {"properties": {"rotation_range_deg": {"const": 360}}, "required": ["rotation_range_deg"]},
}


class TomoScanRequest(PlanRequest):
    """A step-scan tomography: darks, flats, then projections over a half or a full turn."""

    model_config = ConfigDict(json_schema_extra=_OFFSET_NEEDS_FULL_TURN)
    plan_name: ClassVar[str] = "tomo_scan"

    num_projections: int = Field(
        180,
        strict=True,
        ge=2,
        le=MAX_PROJECTIONS,
        description="Projections in all, equally spaced over [start_deg, start_deg + rotation_range_deg); "
        "a full turn needs twice as many for the same angular step",
    )
    exposure_s: float = Field(0.05, strict=True, gt=0, le=MAX_EXPOSURE_S, description="Exposure per frame (s)")
    start_deg: float = Field(0.0, strict=True, description="First rotation angle (deg)")
    rotation_range_deg: Literal[180.0, 360.0] = Field(
        180.0, description="180 (half turn, complete for a parallel beam) or 360 (full turn, needed for an axis offset)"
    )
    axis_offset_um: float = Field(
        0.0,
        strict=True,
        description="Offset centre / half acquisition (um): stage x shift for the projections that puts the "
        "rotation axis towards a detector edge, widening the field of view; needs rotation_range_deg=360; 0 = centred",
    )
    num_darks: int = Field(5, strict=True, ge=1, le=MAX_REFERENCE_FRAMES, description="Dark frames (shutter closed)")
    num_flats: int = Field(10, strict=True, ge=1, le=MAX_REFERENCE_FRAMES, description="Flat frames (sample out of the beam)")
    flat_offset_x_um: float | None = Field(
        None,
        strict=True,
        json_schema_extra={"not": {"const": 0}},
        description="Sample x move out of the beam for the flats (um, not 0); empty = 1.5 x the detector width",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        if self.axis_offset_um != 0 and self.rotation_range_deg != 360:
            raise ValueError(
                f"axis_offset_um ({self.axis_offset_um}) (offset centre, half acquisition) needs a full turn: "
                f"rotation_range_deg=360, got {self.rotation_range_deg}"
            )
        if self.flat_offset_x_um == 0:
            raise ValueError("flat_offset_x_um must not be 0 (the flats need the sample out of the beam)")
        return self

    @property
    def stop_deg(self) -> float:
        """End of the angular range (deg), not itself measured."""
        return self.start_deg + self.rotation_range_deg

    @property
    def angle_step_deg(self) -> float:
        return self.rotation_range_deg / self.num_projections

    @property
    def angles_deg(self) -> tuple[float, ...]:
        """Projection angles over ``[start_deg, stop_deg)``, equally spaced (deg)."""
        return tuple(self.start_deg + k * self.angle_step_deg for k in range(self.num_projections))

    @property
    def n_frames(self) -> int:
        return self.num_darks + self.num_flats + self.num_projections


class TomoFlyScanRequest(TomoScanRequest):
    """A fly scan: as the step scan, with the projections taken while the rotation turns."""

    plan_name: ClassVar[str] = "tomo_fly_scan"

    readout_s: float = Field(
        0.001, strict=True, ge=0, le=MAX_EXPOSURE_S, description="Dead time between frames (s); frame period = exposure_s + readout_s"
    )
    run_up_deg: float | None = Field(
        None, strict=True, ge=0, description="Rotation before start_deg and after stop_deg at the fly speed (deg); empty = two angular steps"
    )

    @property
    def period_s(self) -> float:
        return self.exposure_s + self.readout_s

    @property
    def velocity_deg_per_s(self) -> float:
        """The speed that sweeps one angular step per frame period."""
        return self.angle_step_deg / self.period_s

    @property
    def run_up_or_default_deg(self) -> float:
        return 2.0 * self.angle_step_deg if self.run_up_deg is None else self.run_up_deg


class MicrographRequest(PlanRequest):
    """One micrograph centred on a stage position."""

    plan_name: ClassVar[str] = "micrograph"

    stage_x_um: float = Field(0.0, strict=True, description="Microscope stage x at the image centre (um)")
    stage_y_um: float = Field(0.0, strict=True, description="Microscope stage y at the image centre (um)")
    exposure_s: float | None = Field(
        None, strict=True, gt=0, le=MAX_EXPOSURE_S, description="Frame time (s); empty = the detector's current setting"
    )


class AlignRotationAxisRequest(PlanRequest):
    """Finding the rotation axis and the sample's height: projections at 0, 90, 180 and 270 deg with
    their darks and flats, analysed at once, and (``apply``) the stage moved to centre both."""

    plan_name: ClassVar[str] = "align_rotation_axis"

    exposure_s: float = Field(0.05, strict=True, gt=0, le=MAX_EXPOSURE_S, description="Exposure per frame (s)")
    num_darks: int = Field(2, strict=True, ge=1, le=MAX_REFERENCE_FRAMES, description="Dark frames (shutter closed)")
    num_flats: int = Field(2, strict=True, ge=1, le=MAX_REFERENCE_FRAMES, description="Flat frames (sample out of the beam)")
    apply: bool = Field(
        True, strict=True, description="Move stage x (axis onto the centre column) and z (sample onto the centre row) afterwards"
    )


_VECTOR3_SCHEMA = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}

#: A region of interest as a request field: the one :class:`~corrflow.processing.roi.RegionOfInterest`
#: (the kernels' type), given and recorded as its ``to_dict`` record.
RegionOfInterestField = Annotated[
    RegionOfInterest,
    PlainValidator(lambda value: value if isinstance(value, RegionOfInterest) else RegionOfInterest.from_dict(value)),
    PlainSerializer(lambda roi: roi.to_dict(), return_type=dict),
    WithJsonSchema(
        {
            "type": "object",
            "title": "Region of interest",
            "properties": {
                "frame": {"type": "string", "minLength": 1, "description": "Frame of the coordinates"},
                "center_um": {**_VECTOR3_SCHEMA, "description": "Centre (x, y, z) (um)"},
                "half_size_um": {**_VECTOR3_SCHEMA, "description": "Half extents (um); zeros for a point"},
                "label": {"type": "string", "description": "What the region is"},
            },
            "required": ["frame", "center_um"],
            "additionalProperties": False,
        }
    ),
]


class RelocateRoiRequest(PlanRequest):
    """A micrograph of a region found in another instrument's frame, through a recorded transform."""

    plan_name: ClassVar[str] = "relocate_roi"

    roi: RegionOfInterestField = Field(description="The region, in transform_target_frame coordinates (um)")
    sample_from_microscope: tuple[
        tuple[float, float, float, float], tuple[float, float, float, float], tuple[float, float, float, float], tuple[float, float, float, float]
    ] = Field(description="Recorded 4x4 transform transform_target_frame <- microscope_stage (e.g. from registration)")
    transform_target_frame: str = Field("beamline_sample", min_length=1, description="The frame the transform maps into")
    max_out_of_plane_um: float = Field(
        50.0, strict=True, gt=0, description="How far the ROI centre may lie from the imaged plane, stage frame z = 0 (um)"
    )
    exposure_s: float | None = Field(
        None, strict=True, gt=0, le=MAX_EXPOSURE_S, description="Frame time (s); empty = the detector's current setting"
    )

    @field_validator("sample_from_microscope")
    @classmethod
    def _affine(cls, value: Any) -> Any:
        matrix = np.asarray(value, dtype=np.float64)
        if not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
            raise ValueError("must be an invertible affine transform (last row 0 0 0 1)")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        # Written only here: a JSON schema cannot compare two fields (no deployed flow takes this plan).
        if self.roi.frame != self.transform_target_frame:
            raise ValueError(f"roi is in frame {self.roi.frame!r} but the transform maps into {self.transform_target_frame!r}")
        target = self.stage_target_um
        if abs(target[2]) > self.max_out_of_plane_um:
            raise ValueError(
                f"the roi centre is {target[2]:.1f} um off the sectioned plane seen by the microscope "
                f"(max_out_of_plane_um {self.max_out_of_plane_um})"
            )
        return self

    @property
    def stage_target_um(self) -> np.ndarray:
        """The ROI centre in the microscope stage frame, shape ``(3,)`` (um)."""
        return stage_target_um(self.sample_from_microscope, self.roi.center_um)


def stage_target_um(sample_from_microscope: Any, center_um: Any) -> np.ndarray:
    """Microscope stage coordinates of a point given in the sample frame, shape ``(3,)`` (um).

    Parameters
    ----------
    sample_from_microscope
        4x4 homogeneous transform mapping ``microscope_stage`` points to ``beamline_sample``.
    center_um
        The point in ``beamline_sample`` (um), shape ``(3,)``.
    """
    point = np.append(np.asarray(center_um, dtype=np.float64), 1.0)
    return (invert(np.asarray(sample_from_microscope, dtype=np.float64)) @ point)[:3]


class _MosaicGrid(PlanRequest):
    """The grid of a mosaic: snake-ordered tiles, neighbours overlapping; at most MAX_TILES in all."""

    columns: int = Field(1, strict=True, ge=1, le=MAX_TILES, description="Tiles along the fast axis")
    rows: int = Field(1, strict=True, ge=1, le=MAX_TILES, description="Tiles along the slow axis")
    overlap_fraction: float = Field(0.2, strict=True, ge=0, lt=1, description="Fraction of a tile shared by neighbouring tiles")

    @model_validator(mode="after")
    def _at_most_max_tiles(self) -> Self:
        # Written only here: a JSON schema cannot multiply two fields (no deployed flow takes a mosaic).
        if self.columns * self.rows > MAX_TILES:
            raise ValueError(f"columns x rows must be at most {MAX_TILES} tiles, got {self.columns} x {self.rows}")
        return self


class XrayMosaicRequest(_MosaicGrid):
    """Radiographs at one rotation angle over a grid of stage x (across the beam, columns) and z
    (up, rows) positions, with darks and flats, for a sample larger than the field of view."""

    plan_name: ClassVar[str] = "xray_mosaic"

    exposure_s: float = Field(0.05, strict=True, gt=0, le=MAX_EXPOSURE_S, description="Exposure per frame (s)")
    angle_deg: float = Field(0.0, strict=True, description="Rotation angle of all tiles (deg)")
    center_x_um: float | None = Field(None, strict=True, description="Grid centre, stage x (um); empty = where the stage is")
    center_z_um: float | None = Field(None, strict=True, description="Grid centre, stage z (um); empty = where the stage is")
    num_darks: int = Field(5, strict=True, ge=1, le=MAX_REFERENCE_FRAMES, description="Dark frames (shutter closed)")
    num_flats: int = Field(5, strict=True, ge=1, le=MAX_REFERENCE_FRAMES, description="Flat frames (stage beyond the grid's far side)")


class MicrographMosaicRequest(_MosaicGrid):
    """Micrographs over a grid of microscope stage x (columns) and y (rows) positions."""

    plan_name: ClassVar[str] = "micrograph_mosaic"

    center_x_um: float = Field(0.0, strict=True, description="Grid centre, stage x in the microscope_stage frame (um)")
    center_y_um: float = Field(0.0, strict=True, description="Grid centre, stage y in the microscope_stage frame (um)")
    exposure_s: float | None = Field(
        None, strict=True, gt=0, le=MAX_EXPOSURE_S, description="Frame time (s); empty = the detector's current setting"
    )
