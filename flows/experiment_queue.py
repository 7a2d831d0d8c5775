"""Prefect side of the experiment queue (:mod:`corrflow.operations.queue`): dispatcher and enqueue flows.

* ``dispatch-queue/<site>``: runs the site instrument's queued experiments one at a time while
  holding the instrument's leased slot. Triggered on every submit, and by a slow schedule as a
  safety net (after a restart, a dispatcher that died);
* ``enqueue-experiment/<site>``: adds an experiment; give this deployment a schedule to enqueue
  recurring experiments (a nightly calibration scan) that still wait their turn in the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prefect import flow

from corrflow.config.settings import Settings, Site
from corrflow.flows._common import flow_settings
from corrflow.flows.acquire import acquire_micrograph
from corrflow.flows.models import DEFAULT_SAMPLE, Sample
from corrflow.flows.pipeline import correlative_chain
from corrflow.operations.queue import ExperimentQueue, QueueEntry, QueueError, dispatch


@dataclass(frozen=True)
class QueuePlan:
    """What a queued experiment of one plan runs, and where.

    ``arguments(sample, parameters)`` turns a queue entry into the keyword arguments of ``flow``;
    they are validated against the flow's signature when the entry is submitted and again, as the
    flow's parameters, when it runs.
    """

    site: Site
    flow: Any
    arguments: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]


def _chain_arguments(sample: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    # A tomography entry is a whole correlative experiment, started at the beamline.
    return {"request": {"sample": dict(sample), **dict(parameters)}, "site": "beamline"}


def _flow_arguments(sample: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {"sample": dict(sample), **dict(parameters)}


#: plan name -> what runs it
PLANS: dict[str, QueuePlan] = {
    "tomography": QueuePlan("beamline", correlative_chain, _chain_arguments),
    "micrograph": QueuePlan("microscope", acquire_micrograph, _flow_arguments),
}


def instrument_of(settings: Settings, site: Site) -> str:
    if site == "beamline":
        return settings.beamline.name
    if site == "microscope":
        return settings.microscope.name
    raise QueueError(f"site {site!r} has no instrument (queues exist for beamline and microscope)")


def validate_experiment(plan: str, parameters: Mapping[str, Any], sample: Mapping[str, Any], *, plans: Mapping[str, QueuePlan] = PLANS) -> Site:
    """Check plan, parameters and sample now (types, ranges, unknown names); return the plan's site."""
    if plan not in plans:
        raise QueueError(f"plan must be one of {sorted(plans)}, got {plan!r}")
    spec = plans[plan]
    if "sample" in parameters:
        raise QueueError("give the sample separately, not inside parameters")
    try:
        spec.flow.validate_parameters(spec.arguments(sample, parameters))
    except Exception as exc:  # Prefect raises ParameterTypeError / SignatureMismatchError
        raise QueueError(f"invalid parameters for plan {plan!r}: {exc}") from None
    return spec.site


def submit_experiment(
    settings: Settings,
    *,
    plan: str,
    parameters: Mapping[str, Any],
    sample: Mapping[str, Any],
    priority: int = 0,
    submitted_by: str = "local-user",
    trigger: bool = True,
    plans: Mapping[str, QueuePlan] = PLANS,
) -> QueueEntry:
    """Validate and queue an experiment on its plan's instrument; optionally wake that site's dispatcher."""
    site = validate_experiment(plan, parameters, sample, plans=plans)
    entry = ExperimentQueue.from_settings(settings).submit(
        instrument=instrument_of(settings, site),
        plan=plan,
        parameters=parameters,
        sample=sample,
        priority=priority,
        submitted_by=submitted_by,
    )
    if trigger and settings.prefect.api_url:
        trigger_dispatch(site)
    return entry


def trigger_dispatch(site: Site) -> Any:
    """Start a dispatcher run on the site's pool (a no-op in effect if one is already dispatching)."""
    from prefect.deployments import run_deployment

    from corrflow.deployments import deployment_path

    return run_deployment(deployment_path("dispatch-queue", site), parameters={"site": site}, timeout=0, as_subflow=False)


def run_queue(
    settings: Settings,
    site: Site,
    *,
    plans: Mapping[str, QueuePlan] = PLANS,
    until_empty: bool = True,
    flow_run_id: str | None = None,
    log: Any = print,
) -> list[QueueEntry]:
    """Run the site's queue in this process (each experiment as a sub-flow of the caller)."""

    def run_entry(entry: QueueEntry) -> Any:
        spec = plans[entry.plan]
        return spec.flow(**spec.flow.validate_parameters(spec.arguments(entry.sample, entry.parameters)))

    return dispatch(
        settings,
        ExperimentQueue.from_settings(settings),
        instrument_of(settings, site),
        run_entry,
        until_empty=until_empty,
        flow_run_id=flow_run_id,
        log=log,
    )


@flow(name="dispatch-queue", flow_run_name="{site} · queue", log_prints=True)
def dispatch_queue(site: Site) -> list[dict[str, Any]]:
    """Run the site instrument's queued experiments, one at a time, until the queue is empty."""
    from prefect.runtime import flow_run

    settings = flow_settings()
    done = run_queue(settings, site, flow_run_id=str(flow_run.id) if flow_run.id else None)
    return [{"id": e.id, "plan": e.plan, "state": e.state, "message": e.message} for e in done]


@flow(name="enqueue-experiment", flow_run_name="{site} · {sample.name} · enqueue {plan}", log_prints=True)
def enqueue_experiment(
    site: Site,
    plan: str,
    sample: Sample = DEFAULT_SAMPLE,
    parameters: dict[str, Any] | None = None,
    priority: int = 0,
) -> int:
    """Queue one experiment (plan + parameters + sample) on the site's instrument; returns its queue id."""
    settings = flow_settings()
    if plan not in PLANS or PLANS[plan].site != site:
        raise QueueError(f"plan {plan!r} does not run at site {site!r}")
    entry = submit_experiment(
        settings, plan=plan, parameters=parameters or {}, sample=sample.model_dump(mode="json"), priority=priority
    )
    print(f"queued entry {entry.id} on {entry.instrument} (priority {entry.priority})")
    return entry.id
