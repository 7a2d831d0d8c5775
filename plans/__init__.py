"""Bluesky plans of corrflow and the table the CLI and flows look them up in.

Each plan function validates its arguments when called (:class:`PlanValidationError`) and returns
the plan; its keyword-only parameters are typed so a CLI or a form can be generated from the
signature. The first positional parameter is the instrument the plan runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bluesky.utils import MsgGenerator

from corrflow.plans.metadata import RegionOfInterest, SampleInfo
from corrflow.plans.microscopy import micrograph
from corrflow.plans.tomography import tomo_scan
from corrflow.plans.validation import (
    PlanEstimate,
    PlanValidationError,
    estimate_micrograph,
    estimate_tomo_scan,
    summarize_messages,
)

__all__ = [
    "PLANS",
    "PLAN_SPECS",
    "PlanEstimate",
    "PlanSpec",
    "PlanValidationError",
    "RegionOfInterest",
    "SampleInfo",
    "estimate_micrograph",
    "estimate_tomo_scan",
    "micrograph",
    "summarize_messages",
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


PLAN_SPECS: Mapping[str, PlanSpec] = {
    "tomo_scan": PlanSpec(plan=tomo_scan, estimate=estimate_tomo_scan, instrument="beamline"),
    "micrograph": PlanSpec(plan=micrograph, estimate=estimate_micrograph, instrument="microscope"),
}

PLANS: Mapping[str, Callable[..., MsgGenerator[Any]]] = {name: spec.plan for name, spec in PLAN_SPECS.items()}
