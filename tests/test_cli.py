"""The corrflow command line: help, settings, plans, dry-run, and clear errors with exit status 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from corrflow.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("CORRFLOW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CORRFLOW_DATA_ROOT", str(tmp_path / "data"))


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "dry-run", "plans", "settings"):
        assert command in result.output


def test_settings_prints_the_validated_tree(tmp_path):
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)
    assert settings["data_root"] == str(tmp_path / "data")
    assert settings["beamline"]["mode"] == "sim"


def test_a_wrong_setting_stops_every_command_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CORRFLOW_SIMULATION__TIME_SCALE", "-1")
    for argv in (["settings"], ["demo"], ["dry-run", "tomo_scan"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "simulation.time_scale" in result.output
    assert not (tmp_path / "data").exists(), "nothing may be written when the settings are wrong"


def test_plans_describes_typed_parameters():
    result = runner.invoke(app, ["plans"])
    assert result.exit_code == 0
    plans = json.loads(result.output)
    assert plans["tomo_scan"]["instrument"] == "beamline"
    assert "num_projections" in plans["tomo_scan"]["parameters"]
    assert "exposure_s" in plans["micrograph"]["parameters"]


def test_dry_run_validates_estimates_and_runs_on_simulated_devices():
    result = runner.invoke(
        app, ["dry-run", "tomo_scan", "-p", "num_projections=12", "-p", "exposure_s=0.01", "-p", "num_darks=2",
              "-p", "num_flats=3", "-p", "sample=s1"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["estimate"]["n_frames"] == 12 + 2 + 3
    assert report["messages"]["events"] == {"dark": 2, "flat": 3, "primary": 12}
    assert report["run"]["exit_status"] == "success"
    assert report["run"]["documents"]["event"] == 17
    assert report["run"]["documents"]["stream_resource"] == 3 * 2  # per stream file: the image and the frames' angles
    assert len(report["run"]["files_written"]) == 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["-p", "num_projections=12", "-p", "exposure_s=-1"], "exposure_s"),
        (["-p", "num_projections=1", "-p", "exposure_s=0.1"], "num_projections"),
        (["-p", "num_projections=ten", "-p", "exposure_s=0.1"], "num_projections"),
        (["-p", "num_projectons=12"], "unknown parameter"),
        (["-p", "no-equals-sign"], "NAME=VALUE"),
    ],
)
def test_dry_run_rejects_bad_parameters_with_exit_status_2(params, message):
    result = runner.invoke(app, ["dry-run", "tomo_scan", *params])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_dry_run_of_an_unknown_plan_names_the_known_ones():
    result = runner.invoke(app, ["dry-run", "spiral_scan"])
    assert result.exit_code == 2
    assert "tomo_scan" in result.output


@pytest.mark.fault("two demos at once")
def test_a_second_demo_on_a_busy_data_root_refuses_at_once_naming_the_first(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from corrflow.operations.locks import data_root_lock

    with data_root_lock(tmp_path, what="corrflow demo (the first)"):
        second = subprocess.run(
            [str(Path(sys.executable).parent / "corrflow"), "demo", "--data-root", str(tmp_path)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
        )
    assert second.returncode == 2
    assert f"pid {os.getpid()} (corrflow demo (the first))" in second.stderr + second.stdout
    assert not (tmp_path / "beamline").exists(), "the second demo wrote nothing"
    # The lock goes with its holder: the data root is free again.
    with data_root_lock(tmp_path, what="after"):
        pass
