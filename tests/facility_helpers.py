"""Helpers for the facility tests (deploy, chain, queue): real servers on loopback, cleaned up.

Imported by the test modules (``from facility_helpers import ...``); the fixtures that use these
helpers live in the test modules themselves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

POSTGRES_URL = os.environ.get("CORRFLOW_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_db(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def production_test_settings(data_root: Path, **server: Any):
    """Settings for a throw-away production deployment: random ports, unique databases."""
    from corrflow.config.settings import load_settings

    server_settings = {
        "host": "127.0.0.1",
        "prefect_port": free_port(),
        "tiled_port": free_port(),
        "postgres_url": POSTGRES_URL,
        "prefect_database": unique_db("cf_test_prefect"),
        "catalog_database": unique_db("cf_test_catalog"),
        "worker_query_seconds": 1,
        # Auth on, although on loopback: every facility test goes through Prefect basic auth +
        # CSRF and Tiled scoped API keys, as a facility exposed on its network would.
        "auth": "on",
        "prefect_auth_string": f"corrflow:{uuid.uuid4().hex}",
        "tiled_admin_password": uuid.uuid4().hex,
    } | server
    # Short crash-detection window (the slot lease is at Prefect's minimum, 60 s), so the crash test finishes in minutes.
    server_settings = {"heartbeat_s": 30, "zombie_after_s": 45} | server_settings
    queue = {"poll_s": 0.5, "lease_s": 60, "database_url": f"{server_settings['postgres_url']}/{unique_db('cf_test_queue')}"}
    return load_settings(data_root=data_root, server=server_settings, queue=queue)


def drop_test_databases(settings) -> None:
    from corrflow.operations.server import drop_database

    s = settings.server
    for name in (s.prefect_database, s.catalog_database, s.catalog_database + "_tables", s.catalog_database + "_auth"):
        drop_database(s.postgres_url, name)
    queue_url = settings.queue.database_url or ""
    if queue_url.startswith("postgresql+asyncpg://"):
        server, _, database = queue_url.rpartition("/")
        drop_database(server, database)


@contextlib.contextmanager
def prefect_api(url: str, auth_string: str | None = None, **extra: Any) -> Iterator[None]:
    """Point this process's Prefect client at ``url`` (nested inside any test harness)."""
    import prefect.settings as ps

    updates = {ps.PREFECT_API_URL: url}
    if auth_string:
        updates[ps.PREFECT_API_AUTH_STRING] = auth_string
    for name, value in extra.items():
        updates[getattr(ps, name)] = value
    _forget_slot_services()
    try:
        with ps.temporary_settings(updates=updates):
            yield
    finally:
        _forget_slot_services()


def _forget_slot_services() -> None:
    """Stop Prefect's concurrency-slot services when this process switches servers.

    Prefect acquires leased slots through one service per set of limit names, made on first use
    with the client of the server used then; a test process that talks to the session's test server
    and to the shared facility would otherwise ask the first server for the second one's slots.
    A process in production talks to one server and never needs this.
    """
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=30)


class SharedFacility:
    """One production deployment (Prefect server on PostgreSQL, optionally Tiled and workers) per
    pytest process, shared by the facility test modules: a fresh PostgreSQL database costs ~20 s
    of Prefect migrations on this machine, paid once. Stopped, and its databases dropped, at exit.
    """

    _instance: SharedFacility | None = None

    def __init__(self) -> None:
        import tempfile

        from corrflow.operations.server import prefect_api_url, start_prefect_server

        self.data_root = Path(tempfile.mkdtemp(prefix="corrflow-facility-"))
        self.settings = production_test_settings(self.data_root)
        self.processes: dict[str, Any] = {}
        from corrflow.operations.server import ensure_queue_database

        ensure_queue_database(self.settings)
        self.processes["prefect"] = start_prefect_server(self.settings)
        self.api_url = prefect_api_url(self.settings)
        self.bootstrapped = False

    @classmethod
    def get(cls, config: Any) -> SharedFacility:
        """The shared facility; stopped when pytest unconfigures (``config`` is ``request.config``)."""
        if cls._instance is None:
            cls._instance = SharedFacility()
            config.add_cleanup(cls._instance.close)
        return cls._instance

    def bootstrap(self) -> None:
        from corrflow.operations.deploy import bootstrap

        if not self.bootstrapped:
            with self.client():
                bootstrap(self.settings)
            self.bootstrapped = True

    def client(self):
        """Context in which this process's Prefect client talks to the shared server (with auth)."""
        return prefect_api(self.api_url, self.settings.server.prefect_auth_string.get_secret_value())

    def ensure_tiled(self) -> None:
        from corrflow.operations.server import start_tiled_server

        if "tiled" not in self.processes:
            self.processes["tiled"] = start_tiled_server(self.settings)

    def close(self) -> None:
        import shutil

        for proc in reversed(list(self.processes.values())):
            with contextlib.suppress(Exception):
                proc.stop()
        self.processes.clear()
        with contextlib.suppress(Exception):
            drop_test_databases(self.settings)
        shutil.rmtree(self.data_root, ignore_errors=True)
