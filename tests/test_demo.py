"""`corrflow demo`, as a new user runs it: in one process, and across facilities through real workers.

Both runs get the same settings file through ``--config`` (a detector of 40 rows instead of the
embedded 32), so the test shows that a setting given on the command line reaches the flows of both
runners, the deployed ones included, and that the two runners report the same experiment: the same
seed gives the same scan, volume, registration and hand-off, whichever runner ran the stages.
Slow: about 1.5 min in one process and 2.5 min across facilities on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

DETECTOR_ROWS = 40  # embedded default: 32


def _demo(data_root: Path, config: Path, *extra: str) -> tuple[dict, str]:
    corrflow = str(Path(sys.executable).with_name("corrflow"))
    result = subprocess.run(
        [corrflow, "demo", "--config", str(config), "--data-root", str(data_root), "--projections", "90", *extra],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "COLUMNS": "250"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("summary: ")]
    return json.loads(Path(line.removeprefix("summary: ")).read_text()), result.stderr


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "corrflow.yaml"
    path.write_text(yaml.safe_dump({"simulation": {"xray_detector_shape_px": [DETECTOR_ROWS, 128]}}))
    return path


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, config):
    return _demo(tmp_path_factory.mktemp("in-process"), config)


@pytest.fixture(scope="module")
def across(tmp_path_factory, config):
    root = tmp_path_factory.mktemp("across")
    summary, log = _demo(root, config, "--across-facilities")
    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(root) in part for part in process.info["cmdline"] or []):
                leftovers.append(process.info)
        except psutil.Error:
            continue
    return summary, log, leftovers


def test_a_setting_given_by_config_reaches_the_flows_of_both_runners(in_process, across):
    for summary in (in_process[0], across[0]):
        assert summary["reconstruction"]["shape_zyx"] == [DETECTOR_ROWS, 128, 128]


def test_across_facilities_reports_the_same_experiment_as_in_process(in_process, across):
    one, many = in_process[0], across[0]
    assert one["run_uids"]["tomography"] != many["run_uids"]["tomography"]  # two experiments ...
    for key in ("reconstruction_error", "registration_error"):  # ... with the same outcome
        assert one[key] == pytest.approx(many[key], rel=1e-9, abs=1e-9), key
    np.testing.assert_allclose(one["registration"]["sample_from_microscope"], many["registration"]["sample_from_microscope"])
    for key in ("roi_sample_um", "stage_x_um", "stage_y_um", "true_error_um", "first_pass_true_error_um"):
        assert one["roi_handoff"][key] == pytest.approx(many["roi_handoff"][key]), key
    assert many["roi_handoff"]["true_error_um"] <= 1.0
    assert one["reconstruction"]["center_px"] == pytest.approx(many["reconstruction"]["center_px"])


def test_across_facilities_runs_each_site_on_its_worker_and_leaves_nothing_running(across):
    summary, log, leftovers = across
    for site in ("beamline", "compute", "microscope"):
        assert re.search(rf"^  {site} +.* started [0-9.]+ s after its trigger", log, re.M), log
    assert re.search(r"chain across facilities: [0-9.]+ s from the trigger to the report", log), log
    assert Path(summary["report_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not leftovers, leftovers
