"""The correlative chain, defined once, and the two runners that execute it.

:data:`PIPELINE` is the ordered table of stages: each has a name (which is also the name of its
product in :data:`ChainProducts`), the site whose worker runs it, the function that does the work,
the earlier products it reads and the model of the product it returns::

    stage              site        reads                                        product
    tomography         beamline    -                                            TomographyRun
    transfer           compute     tomography                                   TransferredRun
    reconstruction     compute     tomography, transfer                         ReconstructedVolume
    volume_shipment    microscope  tomography, reconstruction                   ShippedVolume
    micrograph         microscope  tomography                                   MicrographRun
    registration       microscope  tomography, volume_shipment, micrograph      RegisteredMicrograph
    handoff            microscope  tomography, volume_shipment, registration    HandoffResult
    report             microscope  tomography (everything else: the catalog)    ExperimentReport

Two runners execute it, both through :func:`run_stage` (each stage a sub-flow named after the sample
and the stage; instrument stages hold the instrument's concurrency slot and abort their RunEngine
cleanly when the run is cancelled):

* **in process** (:func:`correlative_experiment`: ``corrflow demo``, dry-runs, CI): every stage in
  this process, in order;
* **across facilities** (:func:`correlative_chain`, deployed once per site as
  ``correlative-chain/<site>`` on the site's work pool): a site's run does the stages of its site,
  then starts the next site's deployment with ``run_deployment`` and an idempotency key made of the
  tomography run uid and that site, so a retried or doubled trigger starts it once. Triggers do not
  wait: the beamline is free for the next sample while the compute facility reconstructs.

Every product is catalogued with its parents as its stage makes it; the report stage builds the
summary from what the catalog holds, so both runners report the same thing the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, create_model

from corrflow.acquisition.cancellation import run_abortable
from corrflow.config.settings import Settings, Site
from corrflow.flows._common import sample_name_of, flow_settings
from corrflow.flows.acquire import micrograph_stage, tomography_stage
from corrflow.flows.handoff import handoff_stage
from corrflow.flows.models import (
    ExperimentReport,
    ExperimentRequest,
    HandoffResult,
    MicrographRun,
    ReconstructedVolume,
    RegisteredMicrograph,
    ShippedVolume,
    TomographyRun,
    TransferredRun,
)
from corrflow.flows.reconstruct import reconstruction_stage
from corrflow.flows.register import registration_stage
from corrflow.flows.report import report_stage
from corrflow.flows.transfer import transfer_stage, volume_shipment_stage
from corrflow.operations.queue import instrument_slot
from corrflow.report import progress


class ChainError(RuntimeError):
    """The chain cannot go on as asked (a stage's inputs are missing, a site has nothing to do)."""


@dataclass(frozen=True)
class Stage:
    """One stage of the chain.

    Attributes
    ----------
    name
        The stage, and the name of its product in :data:`ChainProducts`.
    title
        What flow-run names and the dashboard call it.
    site
        The site whose worker runs it (its deployment's work pool).
    run
        ``run(settings, request, **inputs) -> product``: the work, with one keyword per input.
    product
        The model of what it returns.
    inputs
        Names of the earlier stages whose products it reads.
    instrument
        The settings section (``"beamline"`` or ``"microscope"``) of the instrument it drives; the
        stage holds that instrument's slot and is abortable.
    """

    name: str
    title: str
    site: Site
    run: Callable[..., BaseModel]
    product: type[BaseModel]
    inputs: tuple[str, ...] = ()
    instrument: Literal["beamline", "microscope"] | None = None


PIPELINE: tuple[Stage, ...] = (
    Stage("tomography", "tomography", "beamline", tomography_stage, TomographyRun, instrument="beamline"),
    Stage("transfer", "transfer", "compute", transfer_stage, TransferredRun, ("tomography",)),
    Stage("reconstruction", "reconstruction", "compute", reconstruction_stage, ReconstructedVolume, ("tomography", "transfer")),
    Stage("volume_shipment", "volume to the microscope", "microscope", volume_shipment_stage, ShippedVolume,
          ("tomography", "reconstruction")),
    Stage("micrograph", "micrograph", "microscope", micrograph_stage, MicrographRun, ("tomography",), instrument="microscope"),
    Stage("registration", "registration", "microscope", registration_stage, RegisteredMicrograph,
          ("tomography", "volume_shipment", "micrograph")),
    Stage("handoff", "ROI hand-off", "microscope", handoff_stage, HandoffResult,
          ("tomography", "volume_shipment", "registration"), instrument="microscope"),
    Stage("report", "report", "microscope", report_stage, ExperimentReport, ("tomography",)),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in PIPELINE}


class _Products(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def next_stage(self) -> Stage | None:
        """The first stage of :data:`PIPELINE` whose product is missing, or None when all are made."""
        return next((stage for stage in PIPELINE if getattr(self, stage.name) is None), None)


ChainProducts = create_model(
    "ChainProducts",
    __base__=_Products,
    __doc__="What the stages made so far: filled by the chain, left empty when a run starts at the beamline.",
    **{
        stage.name: (stage.product | None, Field(None, description=f"Product of the {stage.title} stage ({stage.site})"))
        for stage in PIPELINE
    },
)


def _stage_run_name() -> str:
    from prefect.runtime import flow_run

    stage = STAGES.get(flow_run.parameters.get("stage", ""))
    return f"{sample_name_of(flow_run.parameters)} · {stage.title if stage else 'stage'}"


@flow(name="chain-stage", flow_run_name=_stage_run_name, log_prints=True)
def _stage_flow(stage: str, request: ExperimentRequest, products: ChainProducts) -> ChainProducts:
    return _do_stage(flow_settings(), STAGES[stage], request, products)


def _do_stage(settings: Settings, stage: Stage, request: ExperimentRequest, products: ChainProducts) -> ChainProducts:
    missing = [name for name in stage.inputs if getattr(products, name) is None]
    if missing:
        raise ChainError(f"stage {stage.name!r} needs the products of {missing}, which this chain has not made")
    inputs = {name: getattr(products, name) for name in stage.inputs}

    def work() -> BaseModel:
        return stage.run(settings, request, **inputs)

    if stage.instrument is None:
        product = work()
    else:
        instrument = getattr(settings, stage.instrument).name
        with instrument_slot(settings, instrument):
            # Cancelling the run aborts the RunEngine first: motors stopped, stop document written.
            product = run_abortable(work, reason=f"{stage.title} cancelled")
    return products.model_copy(update={stage.name: product})


def run_stage(stage: Stage, request: ExperimentRequest, products: ChainProducts) -> ChainProducts:
    """Run one stage as a sub-flow of the calling flow; returns the products with its own added."""
    return _stage_flow.with_options(name=f"stage-{stage.name.replace('_', '-')}")(
        stage=stage.name, request=request, products=products
    )


# -- in-process runner ----------------------------------------------------------------------------
def _experiment_run_name() -> str:
    from prefect.runtime import flow_run

    return f"{sample_name_of(flow_run.parameters)} · correlative experiment"


@flow(name="correlative-experiment", flow_run_name=_experiment_run_name, log_prints=True)
def correlative_experiment(request: ExperimentRequest = ExperimentRequest()) -> ChainProducts:
    """The whole chain for one sample in this process: every stage of :data:`PIPELINE`, in order."""
    from corrflow.operations.deploy import ensure_instrument_limits

    ensure_instrument_limits(flow_settings())
    products = ChainProducts()
    for done, stage in enumerate(PIPELINE):
        progress.report("experiment (stages)", done, len(PIPELINE))
        products = run_stage(stage, request, products)
    progress.report("experiment (stages)", len(PIPELINE), len(PIPELINE))
    return products


# -- across facilities ----------------------------------------------------------------------------
CHAIN_FLOW = "correlative-chain"


def site_segment(products: ChainProducts, site: Site) -> tuple[Stage, ...]:
    """The stages a run at ``site`` does: from the first stage not yet made, while they are ``site``'s."""
    first = products.next_stage()
    if first is None:
        return ()
    if first.site != site:
        raise ChainError(f"this chain's next stage, {first.name!r}, runs at the {first.site} site, not at {site}")
    start = PIPELINE.index(first)
    segment = []
    for stage in PIPELINE[start:]:
        if stage.site != site:
            break
        segment.append(stage)
    return tuple(segment)


def idempotency_key(run_uid: str, site: Site) -> str:
    """The key that makes "start ``site``'s part of the chain of run ``run_uid``" happen once."""
    if not run_uid:
        raise ValueError("run_uid must not be empty")
    return f"corrflow:{run_uid}:{site}"


def chain_run_name(instrument_or_site: str, sample: str, stages: tuple[Stage, ...]) -> str:
    """``sim-tomo · s1 · tomography``, ``compute · s1 · transfer + reconstruction``."""
    return f"{instrument_or_site} · {sample} · {' + '.join(stage.title for stage in stages)}"


def _site_label(settings: Settings, site: Site) -> str:
    return {"beamline": settings.beamline.name, "microscope": settings.microscope.name}.get(site, site)


def _site_stages(site: Site) -> tuple[Stage, ...]:
    return tuple(stage for stage in PIPELINE if stage.site == site)


def _chain_run_name() -> str:
    from prefect.runtime import flow_run

    site = flow_run.parameters.get("site", "beamline")
    return chain_run_name(_site_label(flow_settings(), site), sample_name_of(flow_run.parameters), _site_stages(site))


def trigger_site(site: Site, request: ExperimentRequest, products: ChainProducts, *, tags: tuple[str, ...] = ()) -> Any:
    """Create (once) the flow run of ``site``'s part of this chain on its pool; returns that FlowRun.

    Does not wait for it. Safe to call any number of times, concurrently: the server keeps one run
    per idempotency key and returns it to every caller.
    """
    from prefect.deployments import run_deployment

    from corrflow.deployments import deployment_path

    run_uid = products.tomography.run_uid
    settings = flow_settings()
    return run_deployment(
        deployment_path(CHAIN_FLOW, site),
        parameters={"request": request.model_dump(mode="json"), "site": site, "products": products.model_dump(mode="json")},
        idempotency_key=idempotency_key(run_uid, site),
        flow_run_name=chain_run_name(_site_label(settings, site), request.sample.name, _site_stages(site)),
        tags=[f"run:{run_uid}", f"site:{site}", *tags],
        timeout=0,
        # A separate run, not a sub-flow: it belongs to another facility and outlives this one.
        as_subflow=False,
    )


def _experiment_tags() -> tuple[str, ...]:
    """``experiment:<id>``: the id of the run that started the chain, carried by every site's run."""
    from prefect.runtime import flow_run

    inherited = tuple(tag for tag in (flow_run.tags or []) if tag.startswith("experiment:"))
    if inherited:
        return inherited
    return (f"experiment:{flow_run.id}",) if flow_run.id else ()


@flow(name=CHAIN_FLOW, flow_run_name=_chain_run_name, log_prints=True)
def correlative_chain(
    request: ExperimentRequest = ExperimentRequest(),
    site: Site = "beamline",
    products: ChainProducts = ChainProducts(),
    chain: bool = True,
) -> ChainProducts:
    """This site's part of the correlative chain, then the next site's (started on its work pool).

    Start it at the beamline with the experiment's request only; the products are filled in by the
    sites as the chain goes on.
    """
    segment = site_segment(products, site)
    if not segment:
        print("every stage of this chain is done: nothing to do")
        return products
    for stage in segment:
        products = run_stage(stage, request, products)
    following = products.next_stage()
    if chain and following is not None:
        triggered = trigger_site(following.site, request, products, tags=_experiment_tags())
        print(f"run {products.tomography.run_uid}: {following.site} stages started as flow run {triggered.id}")
    return products


# -- following a chain on the workers ---------------------------------------------------------------
@dataclass(frozen=True)
class SiteRun:
    """One site's flow run of a chain, with its timing (s, epoch)."""

    site: str
    name: str
    state: str
    created_s: float
    started_s: float | None
    ended_s: float | None

    @property
    def start_latency_s(self) -> float | None:
        """From the run's creation (the trigger) to its start on the site's worker."""
        return None if self.started_s is None else self.started_s - self.created_s


@dataclass(frozen=True)
class ChainOutcome:
    """A chain followed to its end: the summary the catalog holds, and how each site's run went."""

    run_uid: str
    summary: dict[str, Any]
    site_runs: tuple[SiteRun, ...]
    wall_s: float

    def handovers_s(self) -> list[float]:
        """From the end of each site's run to the start of the next one's."""
        runs = self.site_runs
        return [b.started_s - a.ended_s for a, b in zip(runs, runs[1:]) if a.ended_s is not None and b.started_s is not None]


def _read_chain_runs(first_id: Any) -> list[Any]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def go() -> list[Any]:
        async with get_client() as client:
            first = await client.read_flow_run(first_id)
            others = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"experiment:{first_id}"]))
            )
        return [first, *(run for run in others if run.id != first.id)]

    return asyncio.run(go())


def run_on_workers(
    settings: Settings, request: ExperimentRequest, *, timeout_s: float = 3600.0, poll_s: float = 1.0
) -> ChainOutcome:
    """Start the chain at the beamline's deployment and follow it across the sites' workers.

    This process's Prefect client must point at the facility's server. Returns when the last
    site's run completed, with the summary read from the catalog; raises :class:`ChainError`
    naming the run as soon as one site's run fails, crashes or is cancelled, or at ``timeout_s``.
    """
    import time

    from prefect.deployments import run_deployment

    from corrflow.deployments import deployment_path
    from corrflow.flows.report import read_summary

    started = time.monotonic()
    first = run_deployment(
        deployment_path(CHAIN_FLOW, "beamline"),
        parameters={"request": request.model_dump(mode="json"), "site": "beamline"},
        timeout=0,
        as_subflow=False,
    )
    last_site = PIPELINE[-1].site
    while True:
        runs = _read_chain_runs(first.id)
        for run in runs:
            if run.state.is_final() and not run.state.is_completed():
                raise ChainError(f"{run.name} ended {run.state.type.value}: {run.state.message}")
        done = [run for run in runs if run.parameters.get("site") == last_site and run.state.is_completed()]
        if done:
            break
        if time.monotonic() - started > timeout_s:
            states = ", ".join(f"{run.name}: {run.state.type.value}" for run in runs)
            raise ChainError(f"the chain did not finish within {timeout_s:.0f} s ({states})")
        time.sleep(poll_s)
    run_uid = done[0].parameters["products"]["tomography"]["run_uid"]
    order = {stage.site: i for i, stage in reversed(list(enumerate(PIPELINE)))}
    site_runs = tuple(
        SiteRun(
            site=run.parameters.get("site", "beamline"),
            name=run.name,
            state=run.state.type.value,
            created_s=run.created.timestamp(),
            started_s=run.start_time.timestamp() if run.start_time else None,
            ended_s=run.end_time.timestamp() if run.end_time else None,
        )
        for run in sorted(runs, key=lambda r: order.get(r.parameters.get("site", "beamline"), 99))
    )
    return ChainOutcome(
        run_uid=run_uid, summary=read_summary(settings, run_uid), site_runs=site_runs, wall_s=time.monotonic() - started
    )
