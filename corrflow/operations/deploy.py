"""`corrflow deploy`: bring a Prefect server to the state the site files describe, idempotently.

It creates what is missing and corrects what differs, and touches nothing else:

* one ``process`` work pool per site (names from ``settings.work_pools``);
* one global concurrency limit of 1 slot per instrument (``instrument-<name>``), which every
  acquisition holds while the instrument is in use;
* the deployments of ``deployments/<site>.yaml``, each named after its site, with the parameter
  schema of its flow (the pydantic models become the dashboard's forms) and its schedules;
* the automation that marks a running flow run Crashed when its heartbeats stop (a worker that
  died leaves its runs "Running" forever otherwise).

Running it twice changes nothing the second time: every object is compared with its desired
state before anything is written, and :func:`bootstrap` reports ``unchanged`` for each.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from corrflow.deployments import DeploymentSpec, ScheduleSpec, SiteSpec, all_sites
from corrflow.config.settings import Settings

ZOMBIE_AUTOMATION_NAME = "corrflow: crash flow runs whose heartbeats stopped"

Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class Action:
    """What the bootstrap did to one object."""

    kind: Literal["work-pool", "concurrency-limit", "deployment", "automation"]
    name: str
    outcome: Outcome

    def __str__(self) -> str:
        return f"{self.outcome:9s} {self.kind:17s} {self.name}"


def instrument_limit_name(instrument: str) -> str:
    """Name of the global concurrency limit (1 slot) of an instrument."""
    return f"instrument-{instrument}"


def _import_flow(entrypoint: str) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def _schedule_key(schedule: Any, active: bool) -> tuple:
    """Comparable form of a server-side schedule or of a ScheduleSpec."""
    if isinstance(schedule, ScheduleSpec):
        interval = None if schedule.interval_s is None else float(schedule.interval_s)
        return (schedule.cron, interval, schedule.timezone if schedule.cron else None, schedule.active)
    cron = getattr(schedule, "cron", None)
    interval = getattr(schedule, "interval", None)
    interval_s = interval.total_seconds() if interval is not None else None
    return (cron, interval_s, getattr(schedule, "timezone", None) if cron else None, active)


def _schedule_create(spec: ScheduleSpec) -> Any:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if spec.cron is not None:
        schedule = CronSchedule(cron=spec.cron, timezone=spec.timezone)
    else:
        schedule = IntervalSchedule(interval=timedelta(seconds=spec.interval_s))
    return DeploymentScheduleCreate(schedule=schedule, active=spec.active)


def desired_deployment(settings: Settings, site: SiteSpec, spec: DeploymentSpec) -> dict[str, Any]:
    """Everything the server should hold for one deployment (comparable with what it holds)."""
    from prefect.utilities.callables import parameter_schema

    flow = _import_flow(spec.entrypoint)
    schema = parameter_schema(flow).model_dump_for_openapi()
    unknown = set(spec.parameters) - set(schema["properties"])
    if unknown:
        raise ValueError(f"{site.site}.yaml: {spec.entrypoint} has no parameters {sorted(unknown)}")
    if spec.schedules:
        # Scheduled runs get only these defaults: validate them now, not when a run starts at 3 am.
        flow.validate_parameters(dict(spec.parameters))
    return {
        "flow_name": flow.name,
        "name": site.site,
        "entrypoint": spec.entrypoint,
        "work_pool_name": settings.work_pool(site.site),
        "description": spec.description,
        "tags": sorted({*spec.tags, f"site:{site.site}"}),
        "parameters": json.loads(json.dumps(spec.parameters)),
        "parameter_openapi_schema": schema,
        "enforce_parameter_schema": True,
        "pull_steps": [],
        "schedules": sorted(_schedule_key(s, s.active) for s in spec.schedules),
    }


def _existing_view(deployment: Any) -> dict[str, Any]:
    return {
        "entrypoint": deployment.entrypoint,
        "work_pool_name": deployment.work_pool_name,
        "description": deployment.description,
        "tags": sorted(deployment.tags or []),
        "parameters": deployment.parameters or {},
        "parameter_openapi_schema": deployment.parameter_openapi_schema,
        "enforce_parameter_schema": deployment.enforce_parameter_schema,
        "pull_steps": deployment.pull_steps or [],
        "schedules": sorted(_schedule_key(s.schedule, s.active) for s in deployment.schedules),
    }


async def _ensure_work_pool(client: Any, name: str, description: str) -> Action:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        await client.create_work_pool(
            WorkPoolCreate(name=name, type="process", description=description, base_job_template=template)
        )
        return Action("work-pool", name, "created")
    if pool.type != "process":
        raise RuntimeError(f"work pool {name!r} exists with type {pool.type!r}, not 'process': rename or delete it")
    if pool.description != description:
        await client.update_work_pool(name, WorkPoolUpdate(description=description))
        return Action("work-pool", name, "updated")
    return Action("work-pool", name, "unchanged")


async def _ensure_limit(client: Any, name: str) -> Action:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
        return Action("concurrency-limit", name, "created")
    if limit.limit != 1 or not limit.active:
        await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
        return Action("concurrency-limit", name, "updated")
    return Action("concurrency-limit", name, "unchanged")


async def _ensure_deployment(client: Any, settings: Settings, site: SiteSpec, spec: DeploymentSpec) -> Action:
    from prefect.exceptions import ObjectNotFound

    desired = desired_deployment(settings, site, spec)
    full_name = f"{desired['flow_name']}/{desired['name']}"
    outcome: Outcome = "created"
    try:
        existing = await client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        existing = None
    if existing is not None:
        comparable = {k: v for k, v in desired.items() if k not in ("flow_name", "name")}
        if _existing_view(existing) == comparable:
            return Action("deployment", full_name, "unchanged")
        outcome = "updated"
    flow_id = await client.create_flow_from_name(desired["flow_name"])
    # POST /deployments upserts on (flow, name): an update replaces fields and schedules in one call.
    await client.create_deployment(
        flow_id=flow_id,
        name=desired["name"],
        entrypoint=desired["entrypoint"],
        work_pool_name=desired["work_pool_name"],
        description=desired["description"],
        tags=desired["tags"],
        parameters=desired["parameters"],
        parameter_openapi_schema=desired["parameter_openapi_schema"],
        enforce_parameter_schema=True,
        pull_steps=[],
        schedules=[_schedule_create(s) for s in spec.schedules],
    )
    return Action("deployment", full_name, outcome)


def zombie_automation(settings: Settings) -> Any:
    """The automation that marks a Running flow run Crashed when its heartbeats stop.

    Flow runs started by a worker emit ``prefect.flow-run.heartbeat`` every
    ``settings.server.heartbeat_s`` seconds; if neither a heartbeat nor a terminal state event
    follows within ``settings.server.zombie_after_s``, the run's process is gone.
    """
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION_NAME,
        description="A worker or flow-run process died: its run stopped sending heartbeats. Created by `corrflow deploy`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=settings.server.zombie_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {settings.server.zombie_after_s:.0f} s: the process running it died",
            )
        ],
    )


def _automation_view(automation: Any) -> dict[str, Any]:
    data = json.loads(automation.model_dump_json(include={"name", "description", "enabled", "trigger", "actions"}))
    data["trigger"].pop("id", None)
    # after/expect/for_each are sets: their JSON order follows the process's hash seed.
    for key in ("after", "expect", "for_each"):
        if isinstance(data["trigger"].get(key), list):
            data["trigger"][key] = sorted(data["trigger"][key])
    return data


async def _ensure_automation(client: Any, settings: Settings) -> Action:
    from prefect.events.schemas.automations import AutomationCore

    desired = zombie_automation(settings)
    core = AutomationCore.model_validate(desired.model_dump(include=set(AutomationCore.model_fields)))
    existing = await client.read_automations_by_name(ZOMBIE_AUTOMATION_NAME)
    if not existing:
        await client.create_automation(core)
        return Action("automation", ZOMBIE_AUTOMATION_NAME, "created")
    first, *duplicates = existing
    for extra in duplicates:  # left by an interrupted earlier bootstrap: one is enough
        await client.delete_automation(extra.id)
    if _automation_view(first) == _automation_view(core) and not duplicates:
        return Action("automation", ZOMBIE_AUTOMATION_NAME, "unchanged")
    # Replaced rather than updated: Prefect 3.8's update_automation sends an `owner_resource`
    # field that its own server rejects (422).
    await client.delete_automation(first.id)
    await client.create_automation(core)
    return Action("automation", ZOMBIE_AUTOMATION_NAME, "updated")


async def abootstrap(settings: Settings, *, sites: tuple[SiteSpec, ...] | None = None) -> list[Action]:
    """Apply the site files to the Prefect server the current Prefect settings point at."""
    from prefect.client.orchestration import get_client

    sites = sites if sites is not None else all_sites()
    actions: list[Action] = []
    async with get_client() as client:
        for site in sites:
            actions.append(await _ensure_work_pool(client, settings.work_pool(site.site), site.pool_description))
        actions += await _ensure_instrument_limits(client, settings, sites)
        for site in sites:
            for spec in site.deployments:
                actions.append(await _ensure_deployment(client, settings, site, spec))
        actions.append(await _ensure_automation(client, settings))
    return actions


async def _ensure_instrument_limits(client: Any, settings: Settings, sites: tuple[SiteSpec, ...]) -> list[Action]:
    return [
        await _ensure_limit(client, instrument_limit_name(getattr(settings, section).name))
        for site in sites
        for section in site.instruments
    ]


def ensure_instrument_limits(settings: Settings) -> list[Action]:
    """Create or correct the concurrency limit (1 slot) of every instrument the site files declare,
    on the server this process talks to (the in-process chain holds the same slots as the deployed one)."""
    from prefect.client.orchestration import get_client

    async def go() -> list[Action]:
        async with get_client() as client:
            return await _ensure_instrument_limits(client, settings, all_sites())

    return asyncio.run(go())


def bootstrap(settings: Settings, *, sites: tuple[SiteSpec, ...] | None = None) -> list[Action]:
    """Synchronous :func:`abootstrap`."""
    return asyncio.run(abootstrap(settings, sites=sites))
