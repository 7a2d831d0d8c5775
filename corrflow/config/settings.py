"""One typed settings tree for corrflow, validated once at start-up.

Sources, highest priority first:

1. keyword arguments to :func:`load_settings` (tests, the CLI's ``--data-root``);
2. environment variables ``CORRFLOW_<FIELD>``, nested with ``__``
   (``CORRFLOW_PREFECT__API_URL=http://127.0.0.1:4200/api``);
3. a YAML file named by ``CORRFLOW_CONFIG`` (or the ``config_file`` argument);
4. the embedded defaults below: everything on one machine, simulated instruments,
   Prefect on SQLite, a local Tiled catalog on SQLite, all under ``data_root``.

Building settings never opens a network connection or touches hardware; it only checks
values. Directories are created later, by :meth:`Settings.ensure_directories`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

ENV_PREFIX = "CORRFLOW_"
CONFIG_ENV_VAR = "CORRFLOW_CONFIG"


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the setting and the problem."""


class _Section(BaseModel):
    # Every section forbids unknown keys so a typo in YAML or an env var is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefectSettings(_Section):
    """Where flows run. No ``api_url`` means Prefect's ephemeral server on SQLite under ``home``."""

    home: Path | None = Field(None, description="PREFECT_HOME; default <data_root>/prefect")
    api_url: str | None = Field(None, description="URL of a running Prefect server API, e.g. http://127.0.0.1:4200/api")
    database_url: str | None = Field(
        None, description="Server database; default SQLite in <home>. Production: postgresql+asyncpg://..."
    )
    startup_timeout_s: float = Field(
        180.0,
        gt=0,
        description="How long the local (ephemeral) Prefect server may take to start (s); its first start on a new "
        "data root migrates its database, and Prefect's own 20 s default fails on a busy machine",
    )

    @field_validator("api_url")
    @classmethod
    def _api_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class CatalogSettings(_Section):
    """The Tiled catalog that receives every run's documents and every processed product."""

    uri: str | None = Field(
        None, description="Catalog database for the in-process catalog; default sqlite under <data_root>/catalog"
    )
    url: str | None = Field(None, description="URL of a running Tiled server; if set, the in-process catalog is not used")
    api_key: SecretStr | None = Field(None, description="Tiled API key used with `url` (a secret: never printed)")
    batch_size: int = Field(100, ge=1, description="TiledWriter event batch size (1 costs ~33 ms/event, 100 ~2 ms)")
    outage_wait_s: float = Field(
        300.0,
        ge=0,
        description="After a run whose documents the catalog missed (spooled on local disk), how long to wait for "
        "the catalog to come back and replay them before the acquisition fails, keeping the spool (s)",
    )


InstrumentMode = Literal["sim", "epics"]


class ProtectionSettings(_Section):
    """What suspends or fails an acquisition: installed on every run by the production RunEngine
    (:mod:`corrflow.acquisition.runengine`), wherever the instrument has the device to watch."""

    beam_suspend_below_mA: float | None = Field(
        100.0, gt=0, description="Suspend while the ring current is below this (mA); empty = no beam suspender"
    )
    beam_resume_above_mA: float | None = Field(
        None, gt=0, description="Resume once the ring current is back above this (mA); empty = beam_suspend_below_mA"
    )
    beam_settle_s: float = Field(
        5.0, ge=0, description="Wait after the beam is back before resuming (s): optics need time after a refill"
    )
    temperature_excursion: bool = Field(
        True, description="Suspend while the sample temperature is off its setpoint by more than the heater's tolerance"
    )
    reconnect_timeout_s: float = Field(
        2.0, ge=0, description="EPICS mode: how long lost Channel Access connections may last before the run fails (s)"
    )

    @model_validator(mode="after")
    def _resume_above_suspend(self) -> ProtectionSettings:
        low, high = self.beam_suspend_below_mA, self.beam_resume_above_mA
        if low is not None and high is not None and high < low:
            raise ValueError(f"beam_resume_above_mA ({high}) must be >= beam_suspend_below_mA ({low})")
        return self


class InstrumentSettings(_Section):
    """One instrument: simulated in-process, or real EPICS devices under ``epics_prefix``."""

    name: str
    mode: InstrumentMode = "sim"
    epics_prefix: str = ""
    frame: str = Field(description="Name of the instrument's frame of reference")
    protections: ProtectionSettings = Field(ProtectionSettings(), description="Suspenders and the connection watcher")

    @model_validator(mode="after")
    def _epics_needs_prefix(self) -> InstrumentSettings:
        if self.mode == "epics" and not self.epics_prefix:
            raise ValueError("mode 'epics' needs epics_prefix (e.g. 'BL:TOMO:')")
        return self


class BeamlineSettings(InstrumentSettings):
    name: str = "sim-tomo"
    frame: str = "beamline_sample"


class MicroscopeSettings(InstrumentSettings):
    name: str = "sim-sem"
    frame: str = "microscope_stage"


class ComputeSettings(_Section):
    """Where reconstruction slabs are computed: a Dask cluster through prefect-dask."""

    dask_address: str | None = Field(
        None,
        description=(
            "Scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786; none = a local cluster. Start its "
            "workers with DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None "
            "(see corrflow/compute/dask_cluster.py)"
        ),
    )
    dask_workers: int = Field(2, ge=1, le=1024, description="Workers of the local cluster (one process each)")
    threads_per_worker: int = Field(1, ge=1, le=256, description="Threads per local worker (and per FBP call)")


class SimulationSettings(_Section):
    """Knobs of the simulated world (only used by simulated instruments)."""

    seed: int = Field(7, description="Seed for the phantom layout and detector noise")
    time_scale: float = Field(
        1000.0, gt=0, description="Simulated seconds per wall-clock second for motion and heating"
    )
    rotation_axis_offset_px: float = Field(
        3.3, description="True offset of the rotation axis from the detector centre (ground truth for centring)"
    )
    xray_detector_shape_px: tuple[int, int] = Field((32, 128), description="X-ray detector (rows, columns)")
    xray_pixel_size_um: float = Field(8.0, gt=0)
    incident_photons: float = Field(
        2.0e5, gt=0, description="Flat-field photons per pixel per second of exposure (synchrotron-like flux)"
    )
    microscope_image_shape_px: tuple[int, int] = Field((256, 256), description="Microscope image (rows, columns)")
    microscope_pixel_size_um: float = Field(3.0, gt=0)

    @field_validator("xray_detector_shape_px", "microscope_image_shape_px")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8:
            raise ValueError("each dimension must be at least 8 pixels")
        return value


class FacilitySettings(_Section):
    """Storage areas. On one machine these are sibling directories under ``data_root``."""

    beamline_storage: Path | None = Field(None, description="Raw data at the beamline; default <data_root>/beamline")
    compute_storage: Path | None = Field(None, description="Landing area at the compute facility; default <data_root>/compute")
    microscope_storage: Path | None = Field(None, description="Microscope data; default <data_root>/microscope")


Site = Literal["beamline", "compute", "microscope"]
SITES: tuple[Site, ...] = ("beamline", "compute", "microscope")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback_host(host: str) -> bool:
    """``host`` is a loopback address, or a name that resolves to loopback addresses only.

    Decided on the address, never on the spelling: ``127.attacker.example`` is whatever its DNS says.
    A name that does not resolve is not loopback (so authentication stays on).
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


class WorkPoolSettings(_Section):
    """One Prefect work pool (and one worker) per site; deployments of a site run on its pool."""

    beamline: str = Field("corrflow-beamline", description="Work pool of the beamline site (acquisition)")
    compute: str = Field("corrflow-compute", description="Work pool of the compute facility (transfer, reconstruction)")
    microscope: str = Field("corrflow-microscope", description="Work pool of the microscope site (micrograph, registration)")


class SFTPSettings(_Section):
    """The SSH/SFTP transfer backend: the compute facility's landing area as seen over SSH."""

    host: str = Field("127.0.0.1", description="SSH server of the destination facility")
    port: int = Field(22, ge=1, le=65535)
    username: str = Field("corrflow", description="SSH user")
    key_file: Path | None = Field(None, description="Private key (no password prompts: automation)")
    known_hosts_file: Path | None = Field(
        None, description="known_hosts holding the server's host key; unknown host keys are rejected"
    )
    remote_root: str = Field("/data/corrflow/compute", description="Destination root directory on the server")
    timeout_s: float = Field(15.0, gt=0, description="Connect / banner / channel timeout (s)")


class GlobusSettings(_Section):
    """The optional Globus backend (globus-sdk): a transfer task between two collections."""

    source_collection: str | None = Field(None, description="Globus collection id of the beamline storage")
    destination_collection: str | None = Field(None, description="Globus collection id of the compute storage")
    source_root: str = Field("/", description="Path of the beamline storage root on the source collection")
    destination_root: str = Field("/", description="Path of the compute storage root on the destination collection")
    client_id: str | None = Field(None, description="Globus confidential client (service account) id")
    client_secret_file: Path | None = Field(None, description="File holding the confidential client's secret")
    poll_interval_s: float = Field(5.0, gt=0, description="Seconds between task status polls")
    timeout_s: float = Field(3600.0, gt=0, description="Give up waiting for a task after this long (s)")


class TransferSettings(_Section):
    """How raw data moves between facilities, and how long verified source copies are kept."""

    backend: Literal["local", "sftp", "globus"] = Field(
        "local", description="local = mounted filesystem; sftp = SSH server; globus = Globus transfer (optional)"
    )
    retries: int = Field(3, ge=0, le=20, description="Retries after a transient (network) error")
    retry_delay_s: float = Field(1.0, ge=0, description="First retry delay (s); doubles at each retry")
    retention_days: float = Field(
        30.0, ge=0, description="Source copies verified at the destination are pruned after this age (days)"
    )
    sftp: SFTPSettings = SFTPSettings()
    globus: GlobusSettings = GlobusSettings()


class ServerSettings(_Section):
    """Production mode (`corrflow server up`): Prefect server and Tiled server on PostgreSQL."""

    host: str = Field("127.0.0.1", description="Bind address of both servers; a non-loopback address turns auth on")
    prefect_port: int = Field(4200, ge=1, le=65535)
    tiled_port: int = Field(8000, ge=1, le=65535)
    database: Literal["postgresql", "sqlite"] = Field(
        "postgresql",
        description="Where both servers keep their data: PostgreSQL (production; several processes) or SQLite files "
        "under <data_root>/server (one machine: `corrflow demo --across-facilities`)",
    )
    postgres_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432",
        description="PostgreSQL server (no database part): postgresql+asyncpg://USER[:PASSWORD]@HOST:PORT",
    )
    prefect_database: str = Field("corrflow_prefect", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    catalog_database: str = Field("corrflow_catalog", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="Authentication of both servers: auto = on exactly when host is not loopback"
    )
    prefect_auth_string: SecretStr | None = Field(
        None, description="Prefect server basic auth 'user:password'; required when auth is on (a secret)"
    )
    tiled_admin_password: SecretStr | None = Field(
        None,
        description="Password of Tiled's 'corrflow-admin' account, used only by `corrflow server up` to issue "
        "the scoped API keys; required there when auth is on, never given to a worker (a secret)",
    )
    ca_file: Path | None = Field(
        None,
        description="CA certificate (PEM) that signed the certificate of the TLS proxy in front of the servers "
        "(a facility's private CA); every client verifies both servers against it. Default: the system's store",
    )
    worker_query_seconds: float = Field(
        2.0, gt=0, description="PREFECT_WORKER_QUERY_SECONDS for workers: trigger-to-run latency"
    )
    heartbeat_s: int = Field(
        30, ge=30, description="PREFECT_FLOWS_HEARTBEAT_FREQUENCY of flow runs started by workers (s; Prefect's minimum is 30)"
    )
    zombie_after_s: float = Field(
        90.0, gt=0, description="A running flow run without a heartbeat for this long is marked Crashed (s)"
    )

    @field_validator("postgres_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if not value.startswith("postgresql+asyncpg://"):
            raise ValueError("must start with postgresql+asyncpg:// (Prefect and Tiled use asyncpg)")
        if value.rstrip("/").count("/") > 2:
            raise ValueError("give the server only, without a database name (databases are named separately)")
        return value.rstrip("/")

    @property
    def is_loopback(self) -> bool:
        """The host resolves to loopback addresses only (a name like ``127.example.org`` is not loopback)."""
        return is_loopback_host(self.host)

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and not self.is_loopback)

    @model_validator(mode="after")
    def _auth_when_exposed(self) -> ServerSettings:
        if self.auth == "off" and not self.is_loopback:
            raise ValueError(f"auth cannot be off when host {self.host!r} is not loopback")
        # Every client of an authenticated Prefect server needs its credential; the Tiled admin
        # password only the process that issues the keys (checked there: missing_server_secrets).
        if self.auth_enabled and not secret_value(self.prefect_auth_string):
            reason = "auth is on" if self.is_loopback else f"host {self.host!r} is not loopback"
            raise ValueError(f"{reason}: set prefect_auth_string")
        if self.prefect_auth_string is not None and ":" not in secret_value(self.prefect_auth_string):
            raise ValueError("prefect_auth_string must be 'user:password'")
        return self

    def missing_server_secrets(self) -> list[str]:
        """The secrets the servers themselves need that these settings lack (``corrflow server up``)."""
        if not self.auth_enabled:
            return []
        return [name for name in ("prefect_auth_string", "tiled_admin_password") if not secret_value(getattr(self, name))]

    def database_url(self, database: str) -> str:
        return f"{self.postgres_url}/{database}"


class QueueSettings(_Section):
    """The experiment queue: where queued experiments are kept (survives restarts of everything else)."""

    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL; default sqlite+aiosqlite under <data_root>/queue. "
        "Production: postgresql+asyncpg://.../corrflow_queue",
    )
    lease_s: float = Field(
        60.0, ge=60, description="Lease of an instrument's concurrency slot, renewed while held (s; Prefect's minimum is 60)"
    )
    poll_s: float = Field(2.0, gt=0, description="How often a waiting dispatcher looks at the queue (s)")


def _default_data_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corrflow"


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    data_root: Path = Field(default_factory=_default_data_root, description="Root of all local data")
    prefect: PrefectSettings = PrefectSettings()
    catalog: CatalogSettings = CatalogSettings()
    beamline: BeamlineSettings = BeamlineSettings()
    microscope: MicroscopeSettings = MicroscopeSettings()
    facilities: FacilitySettings = FacilitySettings()
    simulation: SimulationSettings = SimulationSettings()
    work_pools: WorkPoolSettings = WorkPoolSettings()
    transfer: TransferSettings = TransferSettings()
    server: ServerSettings = ServerSettings()
    queue: QueueSettings = QueueSettings()
    compute: ComputeSettings = ComputeSettings()

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, value: Path) -> Path:
        value = value.expanduser()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory")
        return value.absolute()

    # -- derived locations (no I/O) -------------------------------------------------------
    @property
    def prefect_home(self) -> Path:
        return self.prefect.home or self.data_root / "prefect"

    @property
    def prefect_database_url(self) -> str:
        return self.prefect.database_url or f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"

    @property
    def catalog_dir(self) -> Path:
        return self.data_root / "catalog"

    @property
    def spool_dir(self) -> Path:
        """Where runs the catalog has not taken yet are kept (:mod:`corrflow.catalog.spool`)."""
        return self.data_root / "spool"

    @property
    def catalog_address(self) -> str:
        """The catalog as an operator knows it (the server's URL, or the embedded catalog's database), no password."""
        return _redacted(self.catalog.url or self.catalog_uri)

    @property
    def catalog_uri(self) -> str:
        return self.catalog.uri or f"sqlite:///{self.catalog_dir / 'catalog.db'}"

    @property
    def queue_database_url(self) -> str:
        return self.queue.database_url or f"sqlite+aiosqlite:///{self.data_root / 'queue' / 'queue.db'}"

    def work_pool(self, site: Site) -> str:
        """Name of the Prefect work pool of ``site`` (beamline, compute or microscope)."""
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        return getattr(self.work_pools, site)

    @property
    def beamline_storage(self) -> Path:
        return self.facilities.beamline_storage or self.data_root / "beamline"

    @property
    def compute_storage(self) -> Path:
        return self.facilities.compute_storage or self.data_root / "compute"

    @property
    def microscope_storage(self) -> Path:
        return self.facilities.microscope_storage or self.data_root / "microscope"

    def storage(self, site: Site) -> Path:
        """The storage root of ``site``: where its raw data (beamline), landed data and volumes
        (compute) or copies and micrographs (microscope) live."""
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        return {"beamline": self.beamline_storage, "compute": self.compute_storage, "microscope": self.microscope_storage}[site]

    def ensure_directories(self) -> None:
        """Create the local directories the embedded defaults use."""
        for path in (
            self.data_root,
            self.prefect_home,
            self.catalog_dir,
            self.beamline_storage,
            self.compute_storage,
            self.microscope_storage,
            self.data_root / "queue",
        ):
            path.mkdir(parents=True, exist_ok=True)

    def prefect_environment(self) -> dict[str, str]:
        """Environment variables that point Prefect at this configuration.

        Must be applied before ``prefect`` is imported (Prefect reads its settings at import).
        """
        env = {
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": self.prefect_database_url,
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(int(math.ceil(self.prefect.startup_timeout_s))),
        }
        if self.prefect.api_url:
            env["PREFECT_API_URL"] = self.prefect.api_url
        return env

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by CORRFLOW_CONFIG, if any."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_ENV_VAR)
        if not path:
            return {}
        return _read_yaml(Path(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"{CONFIG_ENV_VAR}: no such file: {path}")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{CONFIG_ENV_VAR}: {path} is not valid YAML: {exc}") from exc
    if not isinstance(content, dict):
        raise SettingsError(f"{CONFIG_ENV_VAR}: {path} must hold a mapping of settings, not {type(content).__name__}")
    return content


_active: Settings | None = None


def activate(settings: Settings | None) -> None:
    """Make ``settings`` the ones every flow of this process runs with (``None``: load them again).

    A runner that was given validated settings (the CLI from its command line, a file and the
    environment; a test) activates them, so the flows it runs in this process use exactly those and
    never re-read the environment. Processes a worker starts read the settings file it names.
    """
    global _active
    _active = settings


def active_settings() -> Settings:
    """The activated settings, or settings loaded (and validated) from this process's environment."""
    return _active if _active is not None else load_settings()


_NOT_SETTINGS = frozenset({CONFIG_ENV_VAR, "CORRFLOW_SIM_PARENT_PID"})
"""``CORRFLOW_*`` variables that are not settings (the config file; the simulated facility's parent)."""
_SECRET_WORDS = ("password", "secret", "token", "api_key", "credential", "auth")


def _dotted(variable: str) -> str:
    return ".".join(variable.removeprefix(ENV_PREFIX).lower().split("__"))


def secret_value(value: SecretStr | str | None) -> str | None:
    """The text of a secret setting (a ``SecretStr``, or a plain string put in by ``model_copy``)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def settings_document(settings: BaseModel) -> dict[str, Any]:
    """``settings`` as plain JSON values with the secrets' real text: for a 0600 settings file that
    a process validates again (``model_dump`` writes a secret as ``**********``)."""

    def reveal(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
        for name, value in model:
            if isinstance(value, SecretStr):
                data[name] = value.get_secret_value()
            elif isinstance(value, BaseModel) and isinstance(data.get(name), dict):
                reveal(value, data[name])
        return data

    return reveal(settings, settings.model_dump(mode="json", exclude_none=True))


def _looks_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def _redacted(value: Any) -> Any:
    """``value`` with every secret-looking key's value and every URL password replaced, so an error
    never prints a secret."""
    if isinstance(value, Mapping):
        return {k: "***" if _looks_secret(str(k)) else _redacted(v) for k, v in value.items()}
    if isinstance(value, str):
        return re.sub(r"(://[^/:@\s]+):[^@/\s]*@", r"\1:***@", value)
    return value


def unknown_environment_variables(environ: Mapping[str, str]) -> list[str]:
    """``CORRFLOW_*`` variables that name no setting (``CORRFLOW_DATAROOT`` for ``CORRFLOW_DATA_ROOT``).

    A nested setting is ``CORRFLOW_SECTION__FIELD``; a mapping-valued setting takes any key below it.
    Variables for tests (``CORRFLOW_TEST_*``) are not settings and are not checked.
    """
    unknown = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS or name.startswith(f"{ENV_PREFIX}TEST_"):
            continue
        model: Any = Settings
        for part in name.removeprefix(ENV_PREFIX).lower().split("__"):
            fields = getattr(model, "model_fields", None)
            if fields is None:
                break  # below a mapping or a plain value: pydantic checks the value itself
            by_lower = {field.lower(): info for field, info in fields.items()}  # env names ignore case
            if part not in by_lower:
                unknown.append(name)
                break
            annotation = by_lower[part].annotation
            model = next(
                (arg for arg in (annotation, *typing.get_args(annotation)) if isinstance(arg, type) and issubclass(arg, BaseModel)),
                None,
            )
    return unknown


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings once.

    Parameters
    ----------
    config_file
        A YAML file; overrides ``CORRFLOW_CONFIG``.
    **overrides
        Top-level fields, highest priority (e.g. ``data_root=tmp_path``).

    Raises
    ------
    SettingsError
        With one line per wrong setting, naming it as ``section.field`` and saying why.
    """
    unknown = unknown_environment_variables(os.environ)
    if unknown:
        raise SettingsError(
            "invalid corrflow settings:\n"
            + "\n".join(
                f"  {_dotted(name)}: unknown setting (environment variable {name}; check the spelling; see `corrflow settings`)"
                for name in unknown
            )
        )
    previous = os.environ.get(CONFIG_ENV_VAR)
    try:
        if config_file is not None:
            os.environ[CONFIG_ENV_VAR] = str(config_file)
        return Settings(**overrides)
    except PydanticSettingsError as exc:  # a value pydantic-settings could not even parse (e.g. bad JSON)
        raise SettingsError(f"invalid corrflow settings:\n  {exc}") from None
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            reason = error["msg"]
            if error["type"] == "extra_forbidden":
                reason = "unknown setting (check the spelling; see `corrflow settings`)"
            shown = "" if _looks_secret(name) else f" (got {_redacted(error.get('input'))!r})"
            lines.append(f"  {name}: {reason}{shown}")
        raise SettingsError("invalid corrflow settings:\n" + "\n".join(lines)) from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV_VAR, None)
            else:
                os.environ[CONFIG_ENV_VAR] = previous
