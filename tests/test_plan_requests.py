"""One request model per plan: the Prefect server, `corrflow dry-run` and the plan accept and refuse the
same values, at every bound and one step past it, and a cross-field error is refused at submission.

The server side is checked two ways: the bounds through the very function the Prefect server runs on
a submission (``prefect.utilities.schema_tools.validate`` with the deployment's parameter schema,
built as ``corrflow deploy`` builds it), and the cross-field rule against a real Prefect server,
where the refused submission leaves no flow run behind.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError as SchemaValidationError
from prefect.utilities.schema_tools import validate

from corrflow.acquisition.dryrun import DryRunError, parse_plan_parameters
from corrflow.config.settings import load_settings
from corrflow.devices.beamline import build_beamline
from corrflow.devices.sem import build_microscope
from corrflow.flows.pipeline import correlative_chain
from corrflow.plans import PLAN_SPECS, PlanValidationError
from corrflow.plans.requests import AlignRotationAxisRequest, MicrographMosaicRequest, MicrographRequest, RelocateRoiRequest, TomoFlyScanRequest, TomoScanRequest, XrayMosaicRequest
from corrflow.simulators.world import SimulatedWorld

# plan name -> (its request model, where the chain's deployed form holds it, if it does)
MODELS = {
    "tomo_scan": (TomoScanRequest, "tomography"),
    "tomo_fly_scan": (TomoFlyScanRequest, None),  # no deployed flow takes a fly scan yet
    "micrograph": (MicrographRequest, "micrograph"),
    "align_rotation_axis": (AlignRotationAxisRequest, None),  # run from the queue or the dry-run, not the chain
    "relocate_roi": (RelocateRoiRequest, None),
    "micrograph_mosaic": (MicrographMosaicRequest, None),
    "xray_mosaic": (XrayMosaicRequest, None),
}
# Required fields of a plan, given in every case of it (the case adds or replaces one field).
_IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
BASE = {
    "relocate_roi": {
        "roi": {"frame": "beamline_sample", "center_um": [10.0, 20.0, 0.0], "half_size_um": [5.0, 5.0, 5.0]},
        "sample_from_microscope": _IDENTITY,
    },
}
SCHEMA = parameter_schema(correlative_chain).model_dump_for_openapi()  # as `corrflow deploy` builds it


def _bound_cases(model) -> list[tuple[str, object, bool]]:
    """(field, value, accepted) at every bound of the model's JSON schema and one step past it."""
    cases = []
    for name, prop in model.model_json_schema()["properties"].items():
        integer = prop.get("type") == "integer"
        step_up = (lambda v: v + 1) if integer else (lambda v: math.nextafter(v, math.inf))
        step_down = (lambda v: v - 1) if integer else (lambda v: math.nextafter(v, -math.inf))
        for option in [prop, *prop.get("anyOf", [])]:
            if "minimum" in option:
                cases += [(name, option["minimum"], True), (name, step_down(option["minimum"]), False)]
            if "maximum" in option:
                cases += [(name, option["maximum"], True), (name, step_up(option["maximum"]), False)]
            if "exclusiveMinimum" in option:
                cases += [(name, option["exclusiveMinimum"], False), (name, step_up(option["exclusiveMinimum"]), True)]
            if "exclusiveMaximum" in option:
                cases += [(name, option["exclusiveMaximum"], False), (name, step_down(option["exclusiveMaximum"]), True)]
        if "enum" in prop:
            members = prop["enum"]
            cases += [(name, member, True) for member in members]
            cases += [(name, (members[0] + members[-1]) / 2, False)]
    return cases


CASES = [
    pytest.param(plan, values, accepted, id=f"{plan}-{field}={value!r}-{'ok' if accepted else 'refused'}")
    for plan, (model, _) in MODELS.items()
    for field, value, accepted in _bound_cases(model)
    for values in [{**BASE.get(plan, {}), field: value}]
] + [
    # Relocation: the region must be in the transform's frame and on the imaged plane.
    pytest.param("relocate_roi", {**BASE["relocate_roi"], **values}, accepted, id=f"relocate_roi-{label}")
    for label, values, accepted in (
        ("roi-in-another-frame", {"roi": {"frame": "microscope_stage", "center_um": [0.0, 0.0, 0.0]}}, False),
        ("roi-off-the-plane", {"roi": {"frame": "beamline_sample", "center_um": [0.0, 0.0, 50.5]}}, False),
        ("roi-at-the-plane-limit", {"roi": {"frame": "beamline_sample", "center_um": [0.0, 0.0, 50.0]}}, True),
        ("roi-not-3d", {"roi": {"frame": "beamline_sample", "center_um": [0.0, 0.0]}}, False),
        ("roi-unknown-field", {"roi": {"frame": "beamline_sample", "center_um": [0.0, 0.0, 0.0], "size_um": [1, 1, 1]}}, False),
        ("singular-transform", {"sample_from_microscope": [[0.0] * 4, [0.0] * 4, [0.0] * 4, [0.0, 0.0, 0.0, 1.0]]}, False),
        ("not-affine", {"sample_from_microscope": [*_IDENTITY[:3], [0.0, 0.0, 1.0, 1.0]]}, False),
    )
] + [
    # A mosaic: at most MAX_TILES tiles in all.
    pytest.param(plan, values, accepted, id=f"{plan}-{label}")
    for plan in ("micrograph_mosaic", "xray_mosaic")
    for label, values, accepted in (
        ("100x100-tiles", {"columns": 100, "rows": 100}, True),
        ("101x100-tiles", {"columns": 101, "rows": 100}, False),
    )
] + [
    # Cross-field rules (an offset centre needs a full turn; flats need the sample moved).
    pytest.param(plan, values, accepted, id=f"{plan}-{label}")
    for plan in ("tomo_scan", "tomo_fly_scan")
    for label, values, accepted in (
        ("offset-half-turn", {"axis_offset_um": 160.0}, False),
        ("offset-half-turn-explicit", {"axis_offset_um": -160.0, "rotation_range_deg": 180.0}, False),
        ("offset-full-turn", {"axis_offset_um": 160.0, "rotation_range_deg": 360.0}, True),
        ("no-offset-half-turn", {"axis_offset_um": 0.0, "rotation_range_deg": 180.0}, True),
        ("flats-not-moved", {"flat_offset_x_um": 0.0}, False),
        ("flats-moved", {"flat_offset_x_um": -2000.0}, True),
        ("text-for-a-number", {"exposure_s": "0.1"}, False),
        ("bool-for-a-count", {"num_darks": True}, False),
    )
]


@pytest.fixture(scope="module")
def instruments(tmp_path_factory):
    settings = load_settings(data_root=tmp_path_factory.mktemp("requests"))
    world = SimulatedWorld(settings.simulation)
    return {"beamline": build_beamline(settings, world), "microscope": build_microscope(settings, world)}


def test_the_cases_cover_every_bound_of_every_plan_request():
    fields_with_bounds = {(plan, field) for plan, (model, _) in MODELS.items() for field, _, _ in _bound_cases(model)}
    assert {("tomo_scan", f) for f in ("num_projections", "exposure_s", "num_darks", "num_flats", "rotation_range_deg")} <= fields_with_bounds
    assert {("tomo_fly_scan", "readout_s"), ("tomo_fly_scan", "run_up_deg"), ("micrograph", "exposure_s")} <= fields_with_bounds
    assert {("align_rotation_axis", f) for f in ("exposure_s", "num_darks", "num_flats")} <= fields_with_bounds
    assert {("relocate_roi", "max_out_of_plane_um"), ("relocate_roi", "exposure_s")} <= fields_with_bounds
    assert {("micrograph_mosaic", f) for f in ("columns", "rows", "overlap_fraction", "exposure_s")} <= fields_with_bounds
    assert {("xray_mosaic", f) for f in ("columns", "rows", "overlap_fraction", "exposure_s", "num_darks", "num_flats")} <= fields_with_bounds


@pytest.mark.parametrize(("plan", "values", "accepted"), CASES)
@pytest.mark.fault("malformed parameters")
def test_schema_dry_run_and_plan_agree(instruments, plan, values, accepted):
    model, form_field = MODELS[plan]
    spec = PLAN_SPECS[plan]
    verdicts = {}
    # 1. The Prefect server's check of a submission to the deployed chain.
    if form_field is not None:
        parameters = {"request": {form_field: values}, "site": "beamline"}
        try:
            validate(parameters, SCHEMA, raise_on_error=True)
            verdicts["prefect schema"] = True
        except SchemaValidationError:
            verdicts["prefect schema"] = False
    # 2. `corrflow dry-run PLAN name=value ...` (its command line is JSON per value).
    try:
        parse_plan_parameters(plan, {name: json.dumps(value) for name, value in values.items()})
        verdicts["dry-run"] = True
    except DryRunError:
        verdicts["dry-run"] = False
    # 3. The plan itself, when called (building it reads no hardware).
    try:
        spec.plan(instruments[spec.instrument], **values, sample={"name": "bounds"})
        verdicts["plan"] = True
    except PlanValidationError:
        verdicts["plan"] = False
    assert verdicts == {where: accepted for where in verdicts}, verdicts


def test_the_schema_carries_the_cross_field_rule_as_if_then():
    tomography = SCHEMA["definitions"]["TomoScanRequest"]
    assert tomography["then"]["properties"]["rotation_range_deg"] == {"const": 360}


# -- against a real Prefect server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(request):
    from facility_helpers import SharedFacility

    from corrflow.operations.deploy import bootstrap

    facility = SharedFacility.get(request.config)
    with facility.client():
        bootstrap(facility.settings)
        yield facility.settings


@pytest.mark.fault("malformed parameters")
def test_a_cross_field_error_is_refused_at_submission_and_no_flow_run_is_created(server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    async def submit(parameters):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("correlative-chain/beamline")
            only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            before = await client.count_flow_runs(deployment_filter=only_this)
            try:
                run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
                outcome = run.id
            except PrefectHTTPStatusError as exc:
                outcome = exc.response.status_code, exc.response.text
            after = await client.count_flow_runs(deployment_filter=only_this)
            if not isinstance(outcome, tuple):
                await client.delete_flow_run(outcome)  # the accepted one is not for a worker here
            return outcome, after - before

    (status, detail), created = asyncio.run(submit({"request": {"tomography": {"axis_offset_um": 160.0}}}))
    assert status == 409 and "rotation_range_deg" in detail
    assert created == 0, "a refused submission leaves no flow run"
    # The same offset with a full turn is accepted: the refusal was the rule, not the field.
    accepted, created = asyncio.run(
        submit({"request": {"tomography": {"axis_offset_um": 160.0, "rotation_range_deg": 360.0}}})
    )
    assert not isinstance(accepted, tuple) and created == 1
