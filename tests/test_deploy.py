"""`corrflow deploy` against a real Prefect server on PostgreSQL: complete, idempotent, self-repairing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from facility_helpers import SharedFacility

from corrflow.operations.deploy import ZOMBIE_AUTOMATION_NAME, bootstrap, instrument_limit_name
from corrflow.deployments import all_sites


@pytest.fixture(scope="module")
def server(request):
    facility = SharedFacility.get(request.config)
    with facility.client():
        yield facility.settings


def _run(coro):
    return asyncio.run(coro)


async def _state():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployments = await client.read_deployments()
        pools = await client.read_work_pools()
        limits = await client.read_global_concurrency_limits(limit=100, offset=0)
        automations = await client.read_automations_by_name(ZOMBIE_AUTOMATION_NAME)
    # Not the `updated` stamps: Prefect's own services touch them (a deployment or pool turns
    # NOT_READY when a worker of an earlier test stops; slots are taken and released).
    return {
        "deployments": {
            (d.name, str(d.flow_id)): (
                d.id, d.description, d.entrypoint, d.work_pool_name, d.parameters, sorted(d.tags),
                json.dumps(d.parameter_openapi_schema, sort_keys=True),
                sorted((str(s.id), s.active) for s in d.schedules),
            )
            for d in deployments
        },
        "pools": {p.name: (p.id, p.type, p.description) for p in pools},
        "limits": {g.name: (g.id, g.limit, g.active) for g in limits},
        "automations": [(a.id, a.trigger.within) for a in automations],
    }


def test_bootstrap_creates_everything_and_a_second_run_changes_nothing(server):
    first = bootstrap(server)  # "created" on a fresh server; other test modules may have run it first
    n_deployments = sum(len(site.deployments) for site in all_sites())
    assert sum(a.kind == "deployment" for a in first) == n_deployments
    assert {a.outcome for a in first} <= {"created", "unchanged"}
    assert {a.name for a in first if a.kind == "work-pool"} == {"corrflow-beamline", "corrflow-compute", "corrflow-microscope"}
    assert {a.name for a in first if a.kind == "concurrency-limit"} == {
        instrument_limit_name(server.beamline.name),
        instrument_limit_name(server.microscope.name),
    }
    before = _run(_state())
    second = bootstrap(server)
    assert [a.outcome for a in second] == ["unchanged"] * len(second), [str(a) for a in second]
    after = _run(_state())
    assert after == before  # same ids, same contents, same schedule ids: nothing was rewritten
    assert len(after["automations"]) == 1
    assert all(limit == 1 and active for _, limit, active in after["limits"].values())
    assert len(after["deployments"]) >= n_deployments and set(after["pools"]) >= {"corrflow-beamline", "corrflow-compute", "corrflow-microscope"}


def test_bootstrap_repairs_drift_and_touches_only_what_drifted(server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    bootstrap(server)

    async def drift():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("flight-check/compute")
            await client.update_deployment(deployment.id, DeploymentUpdate(description="edited by hand"))
            await client.delete_global_concurrency_limit_by_name(instrument_limit_name(server.microscope.name))
            await client.delete_deployment((await client.read_deployment_by_name("prune/beamline")).id)

    _run(drift())
    actions = {(a.kind, a.name): a.outcome for a in bootstrap(server)}
    assert actions.pop(("deployment", "flight-check/compute")) == "updated"
    assert actions.pop(("deployment", "prune/beamline")) == "created"
    assert actions.pop(("concurrency-limit", instrument_limit_name(server.microscope.name))) == "created"
    assert set(actions.values()) == {"unchanged"}


def test_an_edited_zombie_automation_is_replaced_by_the_declared_one(server):
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    from corrflow.operations.deploy import zombie_automation

    bootstrap(server)
    edited = zombie_automation(server.model_copy(update={"server": server.server.model_copy(update={"zombie_after_s": 999.0})}))

    async def edit_by_hand():
        async with get_client() as client:
            (existing,) = await client.read_automations_by_name(ZOMBIE_AUTOMATION_NAME)
            await client.delete_automation(existing.id)
            await client.create_automation(AutomationCore.model_validate(edited.model_dump(include=set(AutomationCore.model_fields))))

    async def automations():
        async with get_client() as client:
            return await client.read_automations_by_name(ZOMBIE_AUTOMATION_NAME)

    _run(edit_by_hand())
    actions = {(a.kind, a.name): a.outcome for a in bootstrap(server)}
    assert actions[("automation", ZOMBIE_AUTOMATION_NAME)] == "updated"
    (automation,) = _run(automations())
    assert automation.trigger.within.total_seconds() == server.server.zombie_after_s


def test_the_automation_comparison_does_not_depend_on_the_hash_seed():
    """Trigger event sets serialise in hash order; two deploy processes must still agree."""
    code = (
        "import json; from corrflow.operations.deploy import _automation_view, zombie_automation; "
        "from corrflow.config.settings import load_settings; "
        "print(json.dumps(_automation_view(zombie_automation(load_settings())), sort_keys=True))"
    )
    views = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True, timeout=120).stdout
        for seed in ("1", "2", "3")
    }
    assert len(views) == 1, views


def test_deployments_carry_typed_forms_schedules_and_site_pools(server):
    from prefect.client.orchestration import get_client

    bootstrap(server)

    async def read():
        async with get_client() as client:
            return {
                name: await client.read_deployment_by_name(name)
                for name in ("correlative-chain/beamline", "correlative-chain/compute", "flight-check/microscope")
            }

    deployments = _run(read())
    tomo = deployments["correlative-chain/beamline"]
    assert tomo.work_pool_name == "corrflow-beamline" and tomo.entrypoint == "corrflow.flows.pipeline:correlative_chain"
    assert tomo.parameters == {"site": "beamline"}
    schema = tomo.parameter_openapi_schema
    fields = schema["definitions"]["TomoScanRequest"]["properties"]
    assert fields["exposure_s"]["description"] == "Exposure per frame (s)" and fields["exposure_s"]["exclusiveMinimum"] == 0
    assert "Sample" in schema["definitions"] and tomo.enforce_parameter_schema
    compute = deployments["correlative-chain/compute"]
    assert compute.work_pool_name == "corrflow-compute" and compute.parameters == {"site": "compute"}
    check = deployments["flight-check/microscope"]
    assert check.parameters == {"site": "microscope"}
    assert [s.schedule.cron for s in check.schedules] == ["*/30 * * * *"]


def test_every_entrypoint_loads_from_another_working_directory(tmp_path):
    entrypoints = sorted({d.entrypoint for site in all_sites() for d in site.deployments})
    code = (
        "import sys\nfrom prefect.flows import load_flow_from_entrypoint\n"
        "for e in sys.argv[1:]:\n    print(e, load_flow_from_entrypoint(e, use_placeholder_flow=False).name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *entrypoints], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == len(entrypoints)


def test_site_files_reject_unknown_keys_and_file_paths():
    from pydantic import ValidationError

    from corrflow.deployments import DeploymentSpec, ScheduleSpec

    with pytest.raises(ValidationError, match="entrypoint"):
        DeploymentSpec(entrypoint="flows/pipeline.py:correlative_chain", description="x")
    with pytest.raises(ValidationError, match="exactly one"):
        ScheduleSpec(cron="* * * * *", interval_s=5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DeploymentSpec(entrypoint="a.b:c", description="x", schedule="daily")
