"""`corrflow server up` and `corrflow deploy` as commands, in their own processes (slow: fresh
PostgreSQL databases cost ~20 s of Prefect migrations on this machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from facility_helpers import drop_test_databases, production_test_settings

from corrflow.config.settings import settings_document

pytestmark = pytest.mark.slow


def _cli(command: str) -> list[str]:
    """The installed ``corrflow`` command, as operators run it."""
    return [str(Path(sys.executable).with_name("corrflow")), command]


def test_server_up_serves_prefect_and_tiled_on_new_postgresql_databases_then_deploy_is_idempotent(tmp_path):
    settings = production_test_settings(tmp_path / "data", auth="auto")
    config = tmp_path / "corrflow.yaml"
    config.write_text(yaml.safe_dump(settings_document(settings)))  # secrets included (model_dump masks them)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRFLOW_", "PREFECT_"))} | {"CORRFLOW_CONFIG": str(config)}
    up = subprocess.Popen([*_cli("server"), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        prefect = f"http://127.0.0.1:{settings.server.prefect_port}/api"
        tiled = f"http://127.0.0.1:{settings.server.tiled_port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert up.poll() is None, up.stdout.read()
            try:
                if httpx.get(f"{prefect}/health").status_code == 200 and httpx.get(f"{tiled}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        else:
            pytest.fail("servers not healthy within 180 s")
        # Loopback, auth auto -> off: Tiled reads are anonymous, writes need the generated key.
        assert httpx.get(f"{tiled}/api/v1/metadata/").status_code == 200
        for _ in range(2):
            deploy = subprocess.run([*_cli("deploy")], env=env, capture_output=True, text=True, timeout=300)
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        lines = [line for line in deploy.stdout.splitlines() if line.strip()]
        assert lines and all(line.startswith("unchanged") for line in lines), deploy.stdout
        assert "deployment" in deploy.stdout and "correlative-chain/beamline" in deploy.stdout
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(60)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
            drop_test_databases(settings)
    assert up.returncode == 0
    # Everything it started is gone: the ports are free again.
    for port in (settings.server.prefect_port, settings.server.tiled_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
