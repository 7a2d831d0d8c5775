"""Typed requests and products of the correlative chain.

The request models are the flows' parameters, so Prefect's UI builds its run forms from them:
every field has a description and its unit in its name. They validate before anything moves. The
acquisition parts are the plans' own request models (:mod:`corrflow.plans.requests`) and the one
:class:`~corrflow.plans.metadata.Sample`, so a form, the queue, ``corrflow dry-run`` and the plan accept
exactly the same values.

The product models are what each stage of :data:`corrflow.flows.pipeline.PIPELINE` hands to the
next: small records (catalog keys, run uids, files relative to a site's storage root), never
arrays. They travel as JSON between facilities (``run_deployment`` parameters), so a file is named
by the site whose storage holds it and its path under that storage root
(:class:`StoredFile`): each facility resolves it against its own view of that storage.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corrflow.config.settings import Settings, Site
from corrflow.plans.metadata import Sample
from corrflow.plans.requests import MicrographRequest, TomoScanRequest


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- requests ---------------------------------------------------------------------------------
DEFAULT_SAMPLE = Sample(name="sim-sample-01")
"""The sample of a request that names none (the simulated dry-run sample)."""

DEFAULT_TOMOGRAPHY = TomoScanRequest()
"""The chain's default scan: the plan's own defaults (a half turn, 180 projections)."""


class RegistrationParameters(_Model):
    """How the micrograph is placed in the volume: the method, and the limits its result must pass.

    Every method yields the 4x4 ``sample_from_microscope`` and a quality figure; a result outside its
    method's limits is a failure (``RegistrationError``), never a transform handed on.
    """

    section_z_um: float = Field(
        20.0, allow_inf_nan=False,
        description="Nominal height of the sectioned plane in the sample frame (um); refined by registration",
    )
    method: Literal["fiducials", "intensity", "slice_in_volume", "auto"] = Field(
        "fiducials",
        description="'fiducials': fiducial markers detected in the micrograph and in the slices near section_z_um, "
                    "matched and fitted with a similarity (quality: RMS fiducial residual, um). 'intensity': 2-D "
                    "mutual-information registration of the micrograph to the slice at section_z_um, no markers "
                    "needed (quality: normalized mutual information). 'slice_in_volume': the (possibly tilted) plane "
                    "of the volume the micrograph shows, by mutual information, no markers needed (quality: "
                    "normalized mutual information). The last two are also checked against the fiducials where "
                    "these are seen. 'auto': fiducials first; if that fails its quality check, slice-in-volume, "
                    "then intensity; every attempt and why it was rejected is recorded",
    )
    search_half_width_voxels: int = Field(
        3, ge=1, le=64,
        description="Slices on each side of section_z_um searched (voxels): by the fiducial fit, the height "
                    "refinement and the slice-in-volume search",
    )
    fiducial_radius_um: float = Field(
        16.0, gt=0, allow_inf_nan=False,
        description="Nominal radius of the fiducial markers (um); detections within 35 % of it count",
    )
    max_residual_um: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Fiducials: largest accepted RMS fiducial residual (um); empty = half a voxel",
    )
    rotation_range_deg: tuple[float, float] = Field(
        (-180.0, 180.0),
        description="Intensity and slice-in-volume: in-plane rotations searched (microscope stage -> sample, "
                    "counter-clockwise, deg, low then high, within -360..360); narrow it where the stage's mounting "
                    "angle is known",
    )
    max_tilt_deg: float = Field(
        3.0, ge=0, lt=45, allow_inf_nan=False,
        description="Slice-in-volume: if the search with horizontal slabs fails, it is retried with slabs tilted "
                    "by this angle about x and about y (deg); 0 = no retry",
    )
    min_nmi: float | None = Field(
        None, gt=1, le=2, allow_inf_nan=False,
        description="Intensity and slice-in-volume: smallest accepted normalized mutual information "
                    "(dimensionless: 1 = independent images, 2 = one a function of the other); empty = the "
                    "kernel's limit",
    )
    min_significance_sigma: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Intensity and slice-in-volume: smallest accepted significance of that NMI over the NMI of "
                    "deliberately misplaced copies (standard deviations); empty = the kernel's limit",
    )
    fiducial_check_um: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Intensity and slice-in-volume: largest accepted RMS distance (um) between the fiducials as "
                    "the transform places them and as the volume shows them, where fiducials are matched; "
                    "empty = one voxel",
    )

    @field_validator("rotation_range_deg")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not -360.0 <= low <= high <= 360.0:  # also refuses NaN and infinities
            raise ValueError(f"must be (low, high) with -360 <= low <= high <= 360, got {value}")
        return value


class PaganinParameters(_Model):
    """Paganin single-distance phase retrieval (one material of known delta/beta, near field)."""

    delta_beta: float = Field(
        gt=0, allow_inf_nan=False,
        description="delta/beta of the sample's main material (refractive index decrement over absorption index, dimensionless)",
    )
    energy_keV: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Photon energy (keV); empty = the scan's /entry/instrument/monochromator/energy",
    )
    distance_mm: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Sample-detector propagation distance (mm); empty = the scan's /entry/instrument/detector/distance",
    )
    pad_px: int | None = Field(
        None, ge=0, le=4096,
        description="Surroundings each projection is filtered with on every side (px): real detector rows above and "
                    "below each chunk (read as well, so chunks of at least 2 pad_px rows waste little), edge-replicated "
                    "beyond the detector; empty = 16 Paganin lengths, so the chunk size does not change the volume",
    )


class ReconstructionParameters(_Model):
    """Reconstruction settings: filtered back-projection, optional phase retrieval and ring removal, and
    the resolution estimate recorded with the volume."""

    filter_name: Literal["ramp", "shepp-logan", "cosine", "hann"] = Field(
        "shepp-logan", description="FBP filter"
    )
    center_px: float | None = Field(
        None, description="Rotation-axis column (0-based, px); empty = found automatically from the data"
    )
    chunk_rows: int = Field(8, ge=1, le=4096, description="Detector rows reconstructed per chunk (bounds memory)")
    phase_retrieval: PaganinParameters | None = Field(
        None, description="Paganin phase retrieval of every projection before the logarithm; empty = absorption only"
    )
    ring_removal_size_px: int | None = Field(
        None, ge=3, le=4095, json_schema_extra={"not": {"type": "integer", "multipleOf": 2}},  # odd, in the form too
        description="Ring removal: width of the median across detector columns of the sorted sinograms (px, odd, "
                    "wider than twice the widest stripe); empty = off",
    )
    resolution: bool = Field(
        True, description="Estimate the half-dataset resolution (Fourier ring correlation of the middle rows) and "
                          "record it with the volume",
    )
    resolution_threshold: Literal["half-bit", "1/7"] = Field(
        "half-bit", description="FRC threshold of the resolution estimate"
    )

    @field_validator("ring_removal_size_px")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(f"must be odd, got {value}")
        return value


class RoiRequest(_Model):
    """What to look at on the microscope after registration."""

    feature: Literal["largest_pore", "largest_precipitate", "coordinates"] = Field(
        "largest_pore", description="Pick the largest pore/precipitate cut by the sectioned plane, or use x/y/z"
    )
    x_um: float | None = Field(None, description="ROI centre x in the beamline sample frame (um), for 'coordinates'")
    y_um: float | None = Field(None, description="ROI centre y (um), for 'coordinates'")
    z_um: float | None = Field(None, description="ROI centre z (um), for 'coordinates'")
    centre_on_feature: bool = Field(
        True, description="After the first image, one corrective move centres the feature as the micrograph shows it"
    )


class ExperimentRequest(_Model):
    """Everything one correlative experiment needs, from the tomography to the ROI hand-off."""

    sample: Sample = Field(DEFAULT_SAMPLE, description="The sample and who it belongs to")
    tomography: TomoScanRequest = Field(DEFAULT_TOMOGRAPHY, description="The X-ray scan at the beamline (tomo_scan)")
    reconstruction: ReconstructionParameters = Field(
        ReconstructionParameters(), description="Reconstruction at the compute facility"
    )
    micrograph: MicrographRequest = Field(MicrographRequest(), description="The micrograph of the sectioned sample (micrograph)")
    registration: RegistrationParameters = Field(RegistrationParameters(), description="Micrograph-to-volume registration")
    roi: RoiRequest = Field(RoiRequest(), description="The region of interest handed to the microscope")


# -- products ---------------------------------------------------------------------------------
class StoredFile(_Model):
    """A file on one site's storage: the site, and the path below that site's storage root."""

    site: Site = Field(description="The site whose storage holds the file")
    path: str = Field(description="POSIX path below the site's storage root")

    @field_validator("path")
    @classmethod
    def _relative_and_inside(cls, value: str) -> str:
        parts = PurePosixPath(value).parts
        if not parts or PurePosixPath(value).is_absolute() or ".." in parts:
            raise ValueError(f"must be a relative path inside the storage root, got {value!r}")
        return value

    @classmethod
    def under(cls, settings: Settings, site: Site, path: Path) -> StoredFile:
        """The record of ``path``, which must lie under ``site``'s storage root."""
        root = settings.storage(site).resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"{path} is not under the {site} storage {root}")
        return cls(site=site, path=resolved.relative_to(root).as_posix())

    def local_path(self, settings: Settings) -> Path:
        """Where this process reaches the file: the site's storage root in ``settings`` + the path."""
        return settings.storage(self.site) / self.path


class TomographyRun(_Model):
    """The tomography stage's product: a catalogued run and its raw files at the beamline."""

    run_uid: str = Field(description="Bluesky run uid in the catalog (/runs)")
    instrument: str
    files: tuple[StoredFile, ...] = Field(description="Raw files written (detector HDF5 and the NXtomo)")
    nxtomo: StoredFile = Field(description="The raw scan as NeXus NXtomo")


class TransferredRun(_Model):
    """The transfer stage's product: the raw files verified at the compute facility."""

    catalog_key: str = Field(description="Record of the transfer in the catalog (/processed)")
    files: tuple[StoredFile, ...]
    nxtomo: StoredFile = Field(description="The NXtomo file at the compute facility")
    manifest: StoredFile = Field(description="Sizes and sha256 of every file, written last")
    total_bytes: int
    seconds: float


class ReconstructedVolume(_Model):
    """The reconstruction stage's product: the volume at the compute facility, catalogued."""

    catalog_key: str = Field(description="The volume in the catalog (/processed)")
    file: StoredFile
    center_px: float = Field(description="Rotation-axis column used (px)")
    voxel_size_um: float
    shape_zyx: tuple[int, int, int]
    seconds: float
    resolution_um: float | None = Field(
        None, description="Half-dataset resolution of the middle rows (um); empty = not estimated"
    )


class ShippedVolume(_Model):
    """The volume copied to the microscope site and verified there."""

    file: StoredFile = Field(description="The copy on the microscope's storage: what its stages read")
    source: StoredFile = Field(description="The volume on the compute facility's storage")
    sha256: str = Field(description="sha256 of the volume, equal at both sites")
    size_bytes: int = Field(description="Size of the volume (bytes)")
    manifest: StoredFile = Field(description="Transfer manifest beside the copy")
    seconds: float = Field(description="Wall time of the copy and its verification (s)")


class MicrographRun(_Model):
    """A catalogued micrograph run and its files at the microscope."""

    run_uid: str
    instrument: str
    files: tuple[StoredFile, ...]


class RegisteredMicrograph(_Model):
    """The registration stage's product: the micrograph's transform into the X-ray volume's frame."""

    class Quality(_Model):
        """One figure a registration is judged by, and the limits it had to meet."""

        name: str = Field(description="What is measured, e.g. 'rms_residual', 'normalized_mutual_information'")
        value: float = Field(description="The figure, in `unit`")
        unit: str = Field(description="Its unit: 'um', '1' (dimensionless), 'sigma' (standard deviations), 'count'")
        lower_limit: float | None = Field(
            None, description="Accepted only at or above this (in `unit`); empty = no lower limit"
        )
        upper_limit: float | None = Field(
            None, description="Accepted only at or below this (in `unit`); empty = no upper limit"
        )

    class Attempt(_Model):
        """One method tried, and whether its result was accepted."""

        method: Literal["fiducials", "intensity", "slice_in_volume"]
        accepted: bool
        quality: RegisteredMicrograph.Quality | None = Field(
            None, description="Its quality figure; empty = it failed before giving one"
        )
        reason: str = Field("", description="Why it was rejected, or its summary where accepted")

    catalog_key: str = Field(description="The registration in the catalog (/processed)")
    method: Literal["fiducials", "intensity", "slice_in_volume"] = Field(description="How the transform was found")
    sample_from_microscope: list[list[float]] = Field(description="4x4 transform, microscope stage -> beamline sample (um)")
    scale: float
    rotation_deg: float
    translation_um: tuple[float, float, float]
    rms_residual_um: float | None = Field(
        description="RMS distance of the matched fiducials after the fit (um); for 'intensity' and 'slice_in_volume' "
                    "the check against the fiducials; empty = no fiducials matched"
    )
    n_matches: int = Field(description="Fiducials matched between the micrograph and the volume")
    slice_index: int
    section_z_um: float = Field(description="Height of the sectioned plane in the sample frame (um)")
    matched_fiducials_um: list[tuple[float, float]] = Field(
        default_factory=list, description="Matched fiducial centres in the sample frame (x, y), um"
    )
    requested_method: Literal["fiducials", "intensity", "slice_in_volume", "auto"] = Field(
        "fiducials", description="The method asked for (RegistrationParameters.method)"
    )
    quality: RegisteredMicrograph.Quality | None = Field(
        None,
        description="The method's own quality figure: the RMS fiducial residual, or the normalized mutual information",
    )
    checks: list[RegisteredMicrograph.Quality] = Field(
        default_factory=list,
        description="Every other figure the result had to pass (matched fiducials, NMI significance, overlap, "
                    "fiducial check)",
    )
    attempts: list[RegisteredMicrograph.Attempt] = Field(
        default_factory=list, description="The methods tried, in order ('auto' tries several), the accepted one last"
    )


class HandoffResult(_Model):
    """The ROI hand-off stage's product: where the microscope was sent and how close it landed."""

    catalog_key: str = Field(description="The hand-off in the catalog (/processed)")
    roi_sample_um: tuple[float, float, float] = Field(description="ROI centre, beamline sample frame (um)")
    roi_radius_um: float | None = Field(description="Equivalent radius of the chosen feature (um)")
    stage_x_um: float = Field(description="Microscope stage x commanded (um)")
    stage_y_um: float = Field(description="Microscope stage y commanded (um)")
    micrograph_run_uids: list[str] = Field(description="The hand-off micrographs, first pass then corrected")
    first_pass_offset_um: float | None = Field(
        description="First pass: distance of the feature from the micrograph's centre, measured in the image (um)"
    )
    first_pass_true_error_um: float | None = Field(
        None, description="Simulation only: first-pass stage position vs the one that truly centres the feature (um)"
    )
    observed_offset_um: float | None = Field(
        description="Final: distance of the feature from the micrograph's centre, measured in the image (um)"
    )
    true_error_um: float | None = Field(
        None, description="Simulation only: final stage position vs the one that truly centres the feature (um)"
    )


class ExperimentReport(_Model):
    """The report stage's product: the summary (built from the catalog) and its picture."""

    catalog_key: str = Field(description="The report in the catalog (/processed); its metadata is the summary")
    summary: StoredFile = Field(description="The summary as JSON")
    picture: StoredFile = Field(description="The PNG report")
