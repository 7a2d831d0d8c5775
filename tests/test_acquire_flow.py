"""Acquisition as a plain function: bad plan input fails before anything moves or is written."""

from __future__ import annotations

import pytest

from corrflow.flows.acquire import run_tomography
from corrflow.flows.models import Sample, TomographyParameters
from corrflow.plans import PlanValidationError
from corrflow.config.settings import load_settings


def test_invalid_tomography_is_refused_before_any_file_or_catalog_entry(tmp_path):
    settings = load_settings(data_root=tmp_path)
    settings.ensure_directories()
    # Valid for the form (pydantic) but not for the instrument: the stage's rotation limit is 360 deg.
    parameters = TomographyParameters(start_deg=0.0, stop_deg=720.0, num_projections=10)
    with pytest.raises(PlanValidationError, match="deg"):
        run_tomography(settings, Sample(name="bad-input"), parameters)
    assert not any(settings.beamline_storage.rglob("*.h5")), "no detector file may be written"
    assert not (settings.catalog_dir / "catalog.db").exists(), "the catalog must not even be opened"


def test_form_level_validation_names_the_field():
    with pytest.raises(ValueError, match="exposure_s"):
        TomographyParameters(exposure_s=0)
    with pytest.raises(ValueError, match="name"):
        Sample(name="../../etc")


def test_the_tomography_form_fields_are_the_plan_keywords():
    import inspect

    from corrflow.plans import tomo_scan

    keywords = {p.name for p in inspect.signature(tomo_scan).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert set(TomographyParameters.model_fields) <= keywords
