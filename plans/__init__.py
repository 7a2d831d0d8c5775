"""Bluesky plans of corrflow and the table the CLI and flows look them up in.

Each plan function checks its arguments when called (:class:`PlanValidationError`) and returns the
plan; its keyword-only parameters are typed so a CLI or a form can be generated from the signature.
The first positional parameter is the instrument the plan runs on. ``tomo_scan``,
``tomo_fly_scan`` and ``micrograph`` are built from their request models (:mod:`.requests`, the one
definition of what they accept) without touching hardware, and check the instrument in a preflight
that reads it through the RunEngine before the first motion (:mod:`.preflight`).

Layers (as bluesky's): stubs (:mod:`.stubs`: frames, settle, wait for a position) -> wrappers
(bluesky's ``run``/``stage``/``finalize`` preprocessors) -> plans: :mod:`.tomography` (step scan),
:mod:`.fly` (continuous rotation) -- both over a half or a full turn (``rotation_range_deg``), the full
turn optionally with the rotation axis offset towards a detector edge (``axis_offset_um``) for samples
wider than the detector -- :mod:`.mosaic` (X-ray and micrograph tiling), :mod:`.insitu`
(temperature series, time-lapse), :mod:`.alignment` (rotation axis), :mod:`.relocation` (ROI via a
4x4 transform), :mod:`.microscopy` (micrograph). :mod:`.interruptions` holds the suspenders and
the EPICS connection watcher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bluesky.utils import MsgGenerator

from corrflow.plans.alignment import align_rotation_axis, estimate_align_rotation_axis
from corrflow.plans.fly import tomo_fly_scan
from corrflow.plans.insitu import estimate_temperature_series, estimate_time_lapse, temperature_series, time_lapse
from corrflow.plans.metadata import Sample
from corrflow.plans.microscopy import micrograph
from corrflow.plans.mosaic import estimate_micrograph_mosaic, estimate_xray_mosaic, micrograph_mosaic, xray_mosaic
from corrflow.plans.relocation import estimate_relocate_roi, relocate_roi
from corrflow.processing.roi import RegionOfInterest  # the one region type, shared with the kernels
from corrflow.plans.requests import (
    AlignRotationAxisRequest,
    MicrographMosaicRequest,
    MicrographRequest,
    PlanRequest,
    RelocateRoiRequest,
    TomoFlyScanRequest,
    TomoScanRequest,
    XrayMosaicRequest,
)
from corrflow.plans.tomography import tomo_scan
from corrflow.plans.validation import (
    PlanEstimate,
    PlanValidationError,
    estimate_micrograph,
    estimate_tomo_fly_scan,
    estimate_tomo_scan,
    summarize_messages,
)

__all__ = [
    "PLANS",
    "align_rotation_axis",
    "micrograph_mosaic",
    "relocate_roi",
    "temperature_series",
    "time_lapse",
    "xray_mosaic",
    "PLAN_SPECS",
    "MicrographRequest",
    "PlanEstimate",
    "PlanRequest",
    "TomoFlyScanRequest",
    "TomoScanRequest",
    "PlanSpec",
    "PlanValidationError",
    "RegionOfInterest",
    "Sample",
    "estimate_micrograph",
    "estimate_tomo_fly_scan",
    "estimate_tomo_scan",
    "micrograph",
    "summarize_messages",
    "tomo_fly_scan",
    "tomo_scan",
]


@dataclass(frozen=True)
class PlanSpec:
    """A plan, its estimator (same arguments) and the instrument it needs as first argument.

    ``instrument`` names the factory that builds that argument: ``"beamline"`` ->
    :func:`corrflow.devices.beamline.build_beamline`, ``"microscope"`` ->
    :func:`corrflow.devices.sem.build_microscope`.
    """

    plan: Callable[..., MsgGenerator[Any]]
    estimate: Callable[..., PlanEstimate]
    instrument: Literal["beamline", "microscope"]
    request: type[PlanRequest] | None = None
    """The plan's request model (:mod:`.requests`), from which forms and ``corrflow dry-run`` parse it."""


PLAN_SPECS: Mapping[str, PlanSpec] = {
    "tomo_scan": PlanSpec(plan=tomo_scan, estimate=estimate_tomo_scan, instrument="beamline", request=TomoScanRequest),
    "tomo_fly_scan": PlanSpec(
        plan=tomo_fly_scan, estimate=estimate_tomo_fly_scan, instrument="beamline", request=TomoFlyScanRequest
    ),
    "xray_mosaic": PlanSpec(plan=xray_mosaic, estimate=estimate_xray_mosaic, instrument="beamline", request=XrayMosaicRequest),
    "temperature_series": PlanSpec(plan=temperature_series, estimate=estimate_temperature_series, instrument="beamline"),
    "time_lapse": PlanSpec(plan=time_lapse, estimate=estimate_time_lapse, instrument="beamline"),
    "align_rotation_axis": PlanSpec(
        plan=align_rotation_axis, estimate=estimate_align_rotation_axis, instrument="beamline", request=AlignRotationAxisRequest
    ),
    "micrograph_mosaic": PlanSpec(
        plan=micrograph_mosaic, estimate=estimate_micrograph_mosaic, instrument="microscope", request=MicrographMosaicRequest
    ),
    "relocate_roi": PlanSpec(plan=relocate_roi, estimate=estimate_relocate_roi, instrument="microscope", request=RelocateRoiRequest),
    "micrograph": PlanSpec(plan=micrograph, estimate=estimate_micrograph, instrument="microscope", request=MicrographRequest),
}

PLANS: Mapping[str, Callable[..., MsgGenerator[Any]]] = {name: spec.plan for name, spec in PLAN_SPECS.items()}
