"""The one definition of the chain: the stage table both runners execute, and its rules."""

from __future__ import annotations

import inspect

import pytest

from corrflow.flows.models import ExperimentRequest, StoredFile, TomographyRun
from corrflow.flows.pipeline import (
    PIPELINE,
    ChainError,
    ChainProducts,
    correlative_chain,
    correlative_experiment,
    idempotency_key,
    site_segment,
)

TOMOGRAPHY = TomographyRun(
    run_uid="uid-1", instrument="sim-tomo", files=(), nxtomo=StoredFile(site="beamline", path="p/s/tomo_1/s_nxtomo.nxs")
)


def test_every_stage_reads_only_products_made_before_it_and_says_so_in_its_signature():
    made: set[str] = set()
    for stage in PIPELINE:
        assert set(stage.inputs) <= made, (stage.name, stage.inputs)
        keywords = {p.name for p in inspect.signature(stage.run).parameters.values() if p.kind is p.KEYWORD_ONLY}
        assert keywords == set(stage.inputs), (stage.name, keywords)
        assert ChainProducts.model_fields[stage.name].annotation == stage.product | None
        made.add(stage.name)
    assert [stage.name for stage in PIPELINE][-1] == "report"


def test_the_microscope_stages_read_the_microscope_copy_of_the_volume():
    by_name = {stage.name: stage for stage in PIPELINE}
    for name in ("registration", "handoff"):
        assert "volume_shipment" in by_name[name].inputs and "reconstruction" not in by_name[name].inputs
        assert by_name[name].site == by_name["volume_shipment"].site == "microscope"


def test_each_site_runs_one_unbroken_segment_so_each_hands_over_once():
    sites = [stage.site for stage in PIPELINE]
    assert sites == sorted(sites, key=sites.index), sites  # no site comes back after another one
    assert site_segment(ChainProducts(), "beamline") == PIPELINE[:1]
    after_beamline = ChainProducts(tomography=TOMOGRAPHY)
    assert [s.name for s in site_segment(after_beamline, "compute")] == ["transfer", "reconstruction"]
    with pytest.raises(ChainError, match="runs at the compute site, not at microscope"):
        site_segment(after_beamline, "microscope")
    with pytest.raises(ChainError, match="runs at the beamline site"):
        site_segment(ChainProducts(), "compute")


def test_products_travel_as_json_and_files_stay_inside_their_storage():
    products = ChainProducts(tomography=TOMOGRAPHY)
    assert ChainProducts.model_validate_json(products.model_dump_json()) == products
    for bad in ("/abs/file.h5", "../outside.h5", ""):
        with pytest.raises(ValueError, match="relative path inside the storage root"):
            StoredFile(site="beamline", path=bad)


def test_both_runners_take_the_same_request_and_the_deployed_one_forms_from_it():
    from prefect.utilities.callables import parameter_schema

    assert inspect.signature(correlative_experiment.fn).parameters["request"].annotation in (ExperimentRequest, "ExperimentRequest")
    schema = parameter_schema(correlative_chain).model_dump_for_openapi()
    assert list(schema["properties"]) == ["request", "site", "products", "chain"]
    assert set(schema["definitions"]["ExperimentRequest"]["properties"]) == set(ExperimentRequest.model_fields)


def test_idempotency_keys_name_the_run_and_the_site():
    assert idempotency_key("abc", "compute") == "corrflow:abc:compute"
    assert idempotency_key("abc", "compute") != idempotency_key("abc", "microscope")
    with pytest.raises(ValueError, match="run_uid"):
        idempotency_key("", "compute")
