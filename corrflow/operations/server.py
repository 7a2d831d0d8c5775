"""Production mode: a Prefect server and a Tiled server on PostgreSQL, and one worker per site.

``corrflow server up`` starts both servers from the settings (``settings.server``): databases are
created on the PostgreSQL server if missing, the Prefect server gets
``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://.../<prefect_database>``, the Tiled
server gets the catalog configuration of :func:`corrflow.catalog.tiled.catalog_config` with its catalog
and its event tables in PostgreSQL. ``corrflow server worker SITE`` starts a process worker on the
site's work pool with an environment derived from the same settings.

Security: by default both servers bind to loopback. Bound anywhere else, the settings must carry a
Prefect basic-auth string and a Tiled API key (validated in :class:`~corrflow.config.settings.ServerSettings`);
the Prefect server then requires the auth string and CSRF tokens, and the Tiled server accepts no
anonymous request. On loopback Tiled still requires its API key for writing (a key is generated
once and kept, mode 0600, under ``<data_root>/server``).

Every process started here is started in its own session and stopped through its own process
group, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import SecretStr

from corrflow.catalog.tiled import catalog_config, tls_verify
from corrflow.config.settings import SITES, CONFIG_ENV_VAR, ENV_PREFIX, CatalogSettings, Settings, Site, secret_value, settings_document


class ServerError(RuntimeError):
    """A server or worker did not start, or a database could not be prepared; the message says which."""


# -- PostgreSQL -----------------------------------------------------------------------------
def _asyncpg_dsn(postgres_url: str, database: str) -> str:
    return postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1) + f"/{database}"


async def _aensure_database(postgres_url: str, database: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(postgres_url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists:
            return False
        # Identifiers cannot be bound parameters; the name was validated by the settings pattern.
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
        except asyncpg.DuplicateDatabaseError:  # created concurrently by another `server up`
            return False
        return True
    finally:
        await conn.close()


def ensure_database(postgres_url: str, database: str) -> bool:
    """Create ``database`` on the PostgreSQL server if it is missing; True if it was created."""
    _check_db_name(database)
    return asyncio.run(_aensure_database(postgres_url, database))


def drop_database(postgres_url: str, database: str) -> None:
    """Drop ``database`` (closing its connections first). For tests and teardown."""
    import asyncpg

    _check_db_name(database)

    async def go() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(postgres_url, "postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(go())


def _check_db_name(database: str) -> None:
    import re

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", database):
        raise ValueError(f"database name must match [a-z_][a-z0-9_]*, got {database!r}")


def _server_database(settings: Settings, name: str, *, driver: str = "sqlite", asyncpg_dsn: bool = False) -> str:
    """The URL of the servers' database ``name``: on PostgreSQL, or a SQLite file under ``<data_root>/server``."""
    server = settings.server
    if server.database == "sqlite":
        return f"{driver}:///{server_dir(settings) / (name + '.db')}"
    return _asyncpg_dsn(server.postgres_url, name) if asyncpg_dsn else server.database_url(name)


def _ensure_server_database(settings: Settings, name: str) -> None:
    if settings.server.database == "postgresql":
        ensure_database(settings.server.postgres_url, name)
    else:
        server_dir(settings).mkdir(parents=True, exist_ok=True)


# -- URLs, keys, configurations ---------------------------------------------------------------
def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def prefect_api_url(settings: Settings) -> str:
    """The Prefect API this deployment uses: ``prefect.api_url`` if set, else the one `server up` starts."""
    return settings.prefect.api_url or f"http://{_url_host(settings.server.host)}:{settings.server.prefect_port}/api"


def tiled_url(settings: Settings) -> str:
    """The Tiled API: ``catalog.url`` if set, else the one `server up` starts."""
    return settings.catalog.url or f"http://{_url_host(settings.server.host)}:{settings.server.tiled_port}"


def server_dir(settings: Settings) -> Path:
    return settings.data_root / "server"


TILED_ADMIN = "corrflow-admin"
# "register": link detector files written outside Tiled (stream resources) to the catalog.
_WRITER_SCOPES = ["read:metadata", "read:data", "create:node", "write:metadata", "write:data", "register"]
_READER_SCOPES = ["read:metadata", "read:data"]


def site_writer(site: Site) -> str:
    """The name of ``site``'s own Tiled writer (its key file is ``tiled_writer-<site>_key``)."""
    return f"writer-{site}"


#: The keys `server up` issues when auth is on, each for its own service principal: one writer per
#: site (its workers and their flow runs hold only that one, so one site's key can be revoked
#: without touching the others), a writer for operators' commands (replay, reconcile) and a
#: reader for dashboards and users.
TILED_KEY_SCOPES = {
    "writer": _WRITER_SCOPES,
    **{site_writer(site): _WRITER_SCOPES for site in SITES},
    "reader": _READER_SCOPES,
}
#: Tiled role of each key's service principal: a key's scopes must be a subset of its role's, and
#: only Tiled's "admin" role has "register" (the key itself carries none of the admin scopes).
TILED_KEY_ROLES = {name: ("user" if name == "reader" else "admin") for name in TILED_KEY_SCOPES}


def _secret_file(settings: Settings, name: str, make) -> str:
    """A secret kept under ``<data_root>/server`` (mode 0600), made once by ``make()``."""
    path = server_dir(settings) / name
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value


def tiled_single_user_key(settings: Settings) -> str:
    """Loopback without auth: Tiled's single-user key (every scope), generated once and kept."""
    return _secret_file(settings, "tiled_api_key", lambda: secrets.token_hex(32))


def tiled_key(settings: Settings, role: str = "writer") -> str:
    """The key a process uses for the catalog: a scoped key when auth is on, else the single-user key."""
    if not settings.server.auth_enabled:
        return tiled_single_user_key(settings)
    path = server_dir(settings) / f"tiled_{role}_key"
    if not path.exists():
        raise ServerError(f"no Tiled {role} key at {path}: start the servers (`corrflow server up`) first")
    return path.read_text().strip()


def provision_tiled_keys(settings: Settings) -> dict[str, str]:
    """Auth on: issue (once) the keys of :data:`TILED_KEY_SCOPES`, each for its own service principal.

    Logs in as ``corrflow-admin``, creates a service principal per key and a key with its scopes; keys are kept (0600) under ``<data_root>/server`` and re-used while the server accepts them.
    """
    base = tiled_url(settings).rstrip("/") + "/api/v1"
    keys: dict[str, str] = {}
    with httpx.Client(timeout=10.0, verify=tls_verify(settings)) as http:
        admin_token: str | None = None
        for role, scopes in TILED_KEY_SCOPES.items():
            path = server_dir(settings) / f"tiled_{role}_key"
            if path.exists():
                key = path.read_text().strip()
                if http.get(f"{base}/auth/whoami", headers={"Authorization": f"Apikey {key}"}).status_code == 200:
                    keys[role] = key
                    continue
                path.unlink()  # issued by an earlier server whose database is gone
            if admin_token is None:
                admin_token = _tiled_admin_token(http, base, settings)
            headers = {"Authorization": f"Bearer {admin_token}"}
            principal = http.post(f"{base}/auth/principal", params={"role": TILED_KEY_ROLES[role]}, headers=headers)
            if principal.status_code != 200:
                raise ServerError(f"Tiled service principal not created ({principal.status_code}): {principal.text[:200]}")
            issued = http.post(
                f"{base}/auth/principal/{principal.json()['uuid']}/apikey",
                json={"scopes": scopes, "note": f"corrflow {role}", "expires_in": None},  # service keys do not expire
                headers=headers,
            )
            if issued.status_code != 200:
                raise ServerError(f"Tiled {role} key not issued ({issued.status_code}): {issued.text[:200]}")
            key = issued.json()["secret"]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key)
            keys[role] = key
    return keys


def _tiled_admin_token(http: httpx.Client, base: str, settings: Settings) -> str:
    login = http.post(
        f"{base}/auth/provider/local/token",
        data={"username": TILED_ADMIN, "password": secret_value(settings.server.tiled_admin_password)},
    )
    if login.status_code != 200:
        raise ServerError(f"Tiled admin login failed ({login.status_code}): {login.text[:200]}")
    return login.json()["access_token"]


def revoke_tiled_key(settings: Settings, name: str) -> None:
    """Revoke the Tiled key ``name`` (``writer-beamline``, ``reader``, ...) on the server and forget
    it; the next ``server up`` issues a new one. Needs the admin password (``server.*`` settings)."""
    if name not in TILED_KEY_SCOPES:
        raise ServerError(f"no Tiled key named {name!r}: one of {', '.join(TILED_KEY_SCOPES)}")
    path = server_dir(settings) / f"tiled_{name}_key"
    if not path.exists():
        raise ServerError(f"no Tiled {name} key at {path}")
    key = path.read_text().strip()
    base = tiled_url(settings).rstrip("/") + "/api/v1"
    with httpx.Client(timeout=10.0, verify=tls_verify(settings)) as http:
        whoami = http.get(f"{base}/auth/whoami", headers={"Authorization": f"Apikey {key}"})
        if whoami.status_code == 200:
            token = _tiled_admin_token(http, base, settings)
            revoked = http.delete(
                f"{base}/auth/principal/{whoami.json()['uuid']}/apikey",
                params={"first_eight": key[:8]},
                headers={"Authorization": f"Bearer {token}"},
            )
            if revoked.status_code not in (200, 204):
                raise ServerError(f"Tiled {name} key not revoked ({revoked.status_code}): {revoked.text[:200]}")
    path.unlink()


def production_settings(settings: Settings, site: Site | None = None) -> Settings:
    """The settings every production process uses: Prefect API and Tiled URL/key filled in.

    With ``site``, the Tiled key is that site's own writer key (a worker of that site and its flow
    runs); without, the operators' writer key (commands run by a person).
    """
    catalog_update: dict[str, Any] = {"url": tiled_url(settings)}
    if not settings.catalog.api_key:
        catalog_update["api_key"] = SecretStr(tiled_key(settings, site_writer(site) if site else "writer"))
    return settings.model_copy(
        update={
            "prefect": settings.prefect.model_copy(update={"api_url": prefect_api_url(settings)}),
            "catalog": settings.catalog.model_copy(update=catalog_update),
        }
    )


def tiled_server_config(settings: Settings) -> dict[str, Any]:
    """The Tiled server configuration: the catalog of :func:`catalog_config`, in PostgreSQL.

    Auth off (loopback): single-user mode, anonymous reads, writes need the single-user key.
    Auth on: no anonymous access; an admin account that only issues keys; API keys with scopes
    (see :func:`provision_tiled_keys`), their principals in PostgreSQL.
    """
    server = settings.server
    config = catalog_config(settings.model_copy(update={"catalog": CatalogSettings(uri=_server_database(settings, server.catalog_database))}))
    tables = _server_database(settings, server.catalog_database + "_tables", asyncpg_dsn=True)
    for tree in config["trees"]:
        tree["args"]["writable_storage"] = [
            tables if str(s).startswith("sqlite:") else s for s in tree["args"]["writable_storage"]
        ]
    if server.auth_enabled:
        config["authentication"] = {
            "providers": [
                {
                    "provider": "local",
                    "authenticator": "tiled.authenticators:DictionaryAuthenticator",
                    "args": {"users_to_passwords": {TILED_ADMIN: secret_value(server.tiled_admin_password)}},
                }
            ],
            "tiled_admins": [{"provider": "local", "id": TILED_ADMIN}],
            "secret_keys": [_secret_file(settings, "tiled_secret_key", lambda: secrets.token_hex(32))],
            "allow_anonymous_access": False,
        }
        config["database"] = {"uri": _server_database(settings, server.catalog_database + "_auth"), "init_if_not_exists": True}
    else:
        config["authentication"] = {"single_user_api_key": tiled_single_user_key(settings), "allow_anonymous_access": True}
    config["uvicorn"] = {"host": server.host, "port": server.tiled_port}
    return config


def prefect_server_environment(settings: Settings) -> dict[str, str]:
    server = settings.server
    env = {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": _server_database(settings, server.prefect_database, driver="sqlite+aiosqlite"),
        "PREFECT_SERVER_API_HOST": server.host,
        "PREFECT_SERVER_API_PORT": str(server.prefect_port),
        "PREFECT_UI_API_URL": prefect_api_url(settings),
    }
    if server.prefect_auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = secret_value(server.prefect_auth_string)
    if server.auth_enabled:
        env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] = "true"
    return env


def client_settings(settings: Settings, site: Site | None = None) -> Settings:
    """What a worker, a flow run or the CLI gets: the production settings without the servers' own
    secrets (the Tiled admin password, a PostgreSQL password of the servers' databases).

    A client keeps the Prefect credential (Prefect's open-source server has one basic-auth
    credential for every client) and one Tiled writer key (read, write, create, register; it
    cannot issue keys or log in as the admin): ``site``'s own, or the operators' without a site.
    """
    prod = production_settings(settings, site)
    server = prod.server.model_copy(
        update={"tiled_admin_password": None, "postgres_url": re.sub(r"(://[^/:@]+):[^@/]*@", r"\1@", prod.server.postgres_url)}
    )
    return prod.model_copy(update={"server": server})


def client_environment(settings: Settings, site: Site | None = None) -> dict[str, str]:
    """Environment of any process that talks to the production servers (workers, the CLI, flows);
    a worker of ``site`` gets that site's settings file (:func:`write_settings_file`)."""
    env = {
        "PREFECT_API_URL": prefect_api_url(settings),
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": str(settings.server.worker_query_seconds),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.server.heartbeat_s),
        CONFIG_ENV_VAR: str(write_settings_file(client_settings(settings, site), site)),
    }
    if settings.server.prefect_auth_string:
        env["PREFECT_API_AUTH_STRING"] = secret_value(settings.server.prefect_auth_string)
    if settings.server.auth_enabled:
        env["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = "true"
    if settings.server.ca_file is not None:
        # Prefect's client reads its own setting; httpx (under Tiled's client, in any process) the other.
        env["PREFECT_API_SSL_CERT_FILE"] = env["SSL_CERT_FILE"] = str(settings.server.ca_file)
    return env


def settings_file_path(settings: Settings, site: Site | None = None) -> Path:
    """``<data_root>/server/corrflow-production.yaml`` (operators, the CLI, the queue's dispatcher),
    or ``corrflow-production-<site>.yaml`` for a site's workers."""
    return server_dir(settings) / (f"corrflow-production-{site}.yaml" if site else "corrflow-production.yaml")


def write_settings_file(settings: Settings, site: Site | None = None) -> Path:
    """Write the settings a client validates as YAML (0600: it holds a key); returns its path.

    A site's workers and their flow runs read one file (``CORRFLOW_CONFIG``), so every process of a
    deployment validates the same settings. Give it :func:`client_settings`, never the servers' own.
    """
    if secret_value(settings.server.tiled_admin_password):
        raise ServerError("refusing to write the Tiled admin password into a client settings file (use client_settings)")
    path = settings_file_path(settings, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = settings_document(settings)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(data, handle, sort_keys=True)
    os.replace(tmp, path)
    return path


def _clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without CORRFLOW_* and PREFECT_* (the settings file rules), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((ENV_PREFIX, "PREFECT_"))}
    env.update(extra)
    return env


# -- processes --------------------------------------------------------------------------------
@dataclass
class ManagedProcess:
    """A server or worker this module started (own session: stopped through its process group)."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, *, timeout_s: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, for tests of crash detection)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def _spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path, url: str | None = None) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd="/"
        )
    return ManagedProcess(name, process, log_path, url, env)


def wait_until_healthy(proc: ManagedProcess, health_url: str, *, timeout_s: float, headers: Mapping[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServerError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
        try:
            response = httpx.get(health_url, timeout=2.0, headers=dict(headers or {}))
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.3)
    raise ServerError(f"{proc.name} not healthy at {health_url} after {timeout_s:.0f} s ({last}):\n{proc.log_tail()}")


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def start_prefect_server(settings: Settings, *, timeout_s: float = 90.0) -> ManagedProcess:
    server = settings.server
    _ensure_server_database(settings, server.prefect_database)
    env = _clean_environment(prefect_server_environment(settings))
    command = [_bin("prefect"), "server", "start", "--host", server.host, "--port", str(server.prefect_port), "--analytics-off"]
    proc = _spawn("prefect-server", command, env, server_dir(settings) / "logs", prefect_api_url(settings))
    headers = {}
    if server.prefect_auth_string:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(secret_value(server.prefect_auth_string).encode()).decode()
    try:
        wait_until_healthy(proc, prefect_api_url(settings) + "/health", timeout_s=timeout_s, headers=headers)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_tiled_server(settings: Settings, *, timeout_s: float = 90.0) -> ManagedProcess:
    server = settings.server
    if server.auth_enabled and not secret_value(server.tiled_admin_password):
        raise ServerError("auth is on: the Tiled server needs server.tiled_admin_password (to issue the scoped keys)")
    for database in (server.catalog_database, server.catalog_database + "_tables"):
        _ensure_server_database(settings, database)
    if server.auth_enabled:
        _ensure_server_database(settings, server.catalog_database + "_auth")
    settings.catalog_dir.mkdir(parents=True, exist_ok=True)
    (settings.catalog_dir / "data").mkdir(exist_ok=True)
    config = tiled_server_config(settings)
    config_path = server_dir(settings) / "tiled.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the API key
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    env = _clean_environment({})
    command = [_bin("tiled"), "serve", "config", str(config_path), "--host", server.host, "--port", str(server.tiled_port)]
    proc = _spawn("tiled-server", command, env, server_dir(settings) / "logs", tiled_url(settings))
    try:
        wait_until_healthy(proc, tiled_url(settings).rstrip("/") + "/healthz", timeout_s=timeout_s)
        if server.auth_enabled:
            provision_tiled_keys(settings)
    except BaseException:
        proc.stop()
        raise
    return proc


def start_worker(settings: Settings, site: Site, *, name: str | None = None) -> ManagedProcess:
    """A process worker on the site's pool; its flow runs inherit the production settings file."""
    env = _clean_environment(client_environment(settings, site))
    pool = settings.work_pool(site)
    command = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name or f"corrflow-{site}"]
    return _spawn(f"worker-{site}", command, env, server_dir(settings) / "logs")


def ensure_queue_database(settings: Settings) -> bool:
    """Create the experiment queue's PostgreSQL database if the queue lives in one and it is missing."""
    url = settings.queue.database_url
    if not url or not url.startswith("postgresql+asyncpg://"):
        return False
    server, _, database = url.rpartition("/")
    return ensure_database(server, database.split("?", 1)[0])


@contextlib.contextmanager
def servers_up(settings: Settings, *, tiled: bool = True) -> Iterator[dict[str, ManagedProcess]]:
    """Start the Prefect (and Tiled) servers; stop them on exit, whatever happened."""
    started: dict[str, ManagedProcess] = {}
    missing = settings.server.missing_server_secrets()
    if missing:
        raise ServerError(f"auth is on: the servers need {', '.join(f'server.{name}' for name in missing)}")
    ensure_queue_database(settings)
    try:
        started["prefect"] = start_prefect_server(settings)
        if tiled:
            started["tiled"] = start_tiled_server(settings)
        yield started
    finally:
        for proc in reversed(list(started.values())):
            proc.stop()


@contextlib.contextmanager
def prefect_client(settings: Settings) -> Iterator[None]:
    """Point this process's Prefect client at the server the settings describe (the environment
    :func:`client_environment` gives other processes), for the duration of the block."""
    import prefect.settings as ps

    updates: dict[Any, Any] = {ps.PREFECT_API_URL: prefect_api_url(settings)}
    if settings.server.prefect_auth_string:
        updates[ps.PREFECT_API_AUTH_STRING] = secret_value(settings.server.prefect_auth_string)
    if settings.server.auth_enabled:
        updates[ps.PREFECT_CLIENT_CSRF_SUPPORT_ENABLED] = True
    if settings.server.ca_file is not None:
        updates[ps.PREFECT_API_SSL_CERT_FILE] = str(settings.server.ca_file)
    with ps.temporary_settings(updates=updates):
        yield


@dataclass
class LocalFacility:
    """A whole facility on this machine (see :func:`local_facility`)."""

    settings: Settings  # what its processes use: the Prefect API, the Tiled URL and key filled in
    servers: dict[str, ManagedProcess]
    workers: dict[str, ManagedProcess]

    def log_tails(self, lines: int = 40) -> str:
        return "\n\n".join(f"--- {proc.name}\n{proc.log_tail(lines)}" for proc in [*self.servers.values(), *self.workers.values()])


@contextlib.contextmanager
def local_facility(settings: Settings) -> Iterator[LocalFacility]:
    """The three sites on loopback: a Prefect and a Tiled server (on free ports, their databases as
    ``settings.server.database`` says), the deployments of every site (``corrflow deploy``) and one
    process worker per site pool. Everything it started is stopped on exit, whatever happened.
    """
    from corrflow.operations.deploy import bootstrap
    from corrflow.operations.sim_facility import free_port

    server = settings.server.model_copy(update={"host": "127.0.0.1", "prefect_port": free_port(), "tiled_port": free_port()})
    facility_settings = settings.model_copy(update={"server": server})
    workers: dict[str, ManagedProcess] = {}
    with servers_up(facility_settings) as servers:
        try:
            production = production_settings(facility_settings)
            with prefect_client(facility_settings):
                bootstrap(production)
            for site in SITES:
                workers[site] = start_worker(facility_settings, site)
            yield LocalFacility(settings=production, servers=servers, workers=workers)
        finally:
            for worker in workers.values():
                worker.stop()
