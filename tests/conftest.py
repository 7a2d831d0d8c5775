"""Shared fixtures: an isolated Prefect backend and a corrflow data root per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["fault_matrix"]  # the fault table printed at the end of a session

# Prefect reads its settings at import: keep its home and database away from the user's.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real, temporary Prefect server (SQLite) for the whole session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh corrflow data root, exported so flows (which read settings from the env) use it."""
    root = tmp_path_factory.mktemp("corrflow-data")
    previous = os.environ.get("CORRFLOW_DATA_ROOT")
    os.environ["CORRFLOW_DATA_ROOT"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("CORRFLOW_DATA_ROOT", None)
    else:
        os.environ["CORRFLOW_DATA_ROOT"] = previous
