"""The Tiled catalog: where every run's documents land and where they are read back.

Embedded default: an in-process Tiled app over SQLite under ``<data_root>/catalog`` (no socket,
no server to start). Production: a Tiled server (``settings.catalog.url`` + API key), e.g. one
started with ``tiled serve config`` on the file :func:`catalog_config` describes.

Layout: ``/runs`` is a catalog of Bluesky runs (what ``TiledWriter`` writes and databroker's v1
API reads: ``catalog.runs.v1[uid]``); ``/processed`` holds products (reconstructed volumes, ...)
registered in place as external HDF5, each with its provenance and the uids of the runs it came
from. The same configuration serves both modes, so a run written in-process reads back the
same way from a server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corrflow.config.settings import Settings, secret_value

if TYPE_CHECKING:  # imported lazily: tiled's server stack costs seconds to import
    from tiled.client.container import Container

#: The spec that makes a Tiled container a catalog of Bluesky runs (databroker reads it as ``client.v1``).
BLUESKY_CATALOG_SPECS = [{"name": "CatalogOfBlueskyRuns", "version": "3.0"}]
#: Lets databroker's v1 API export whole runs as document streams.
BLUESKY_MEDIA_TYPES = {
    "BlueskyRun": {"application/json-seq": "bluesky_tiled_plugins.exporters:json_seq_exporter"}
}


def catalog_config(settings: Settings) -> dict[str, Any]:
    """Tiled server configuration for the catalog described by ``settings``.

    Detector files anywhere under ``data_root`` and the facility storage areas are readable
    (external HDF5 assets referenced by stream resources); event tables go to a SQL store beside
    the catalog database.
    """
    readable = sorted(
        {
            str(settings.data_root),
            str(settings.beamline_storage),
            str(settings.compute_storage),
            str(settings.microscope_storage),
        }
    )
    return {
        "trees": [
            {
                "path": "/",
                "tree": "catalog",
                "args": {
                    "uri": settings.catalog_uri,
                    "writable_storage": [
                        str(settings.catalog_dir / "data"),
                        f"sqlite:///{settings.catalog_dir / 'tables.db'}",
                    ],
                    "readable_storage": readable,
                    "init_if_not_exists": True,
                },
            }
        ],
        "media_types": BLUESKY_MEDIA_TYPES,
    }


RUNS_KEY = "runs"
PROCESSED_KEY = "processed"


@dataclass(frozen=True)
class Catalog:
    """Clients for the catalog's root and its two containers."""

    root: Container
    runs: Container  # CatalogOfBlueskyRuns: runs by uid, ``.v1`` for databroker
    processed: Container  # products registered with provenance


def _child(root: Container, key: str, specs: list[dict[str, str]] | None) -> Container:
    """The container ``key`` under ``root``, created on first use (safe if two processes race)."""
    from tiled.client.utils import ClientError
    from tiled.structures.core import Spec

    if key not in root:
        try:
            root.create_container(key, specs=[Spec(**s) for s in specs or []])
        except ClientError:
            if key not in root:  # not a lost race with another writer: a real error
                raise
    return root[key]


_contexts: dict[str, Any] = {}
_contexts_lock = threading.Lock()


def _in_process_context(settings: Settings) -> Any:
    """The client context of the in-process Tiled app of this catalog configuration, made once per
    process and closed at its exit.

    Building the app costs seconds (it imports and configures the server stack); a client on a
    started context costs nothing, so every stage of an in-process chain shares one app. The
    context is kept, not re-opened: closing it releases the app's table storage, which a later
    start of the same app does not take back.
    """
    import atexit
    import json

    from tiled.client.context import Context
    from tiled.server.app import build_app_from_config

    config = catalog_config(settings)
    key = json.dumps(config, sort_keys=True)
    with _contexts_lock:
        if key not in _contexts:
            settings.catalog_dir.mkdir(parents=True, exist_ok=True)
            (settings.catalog_dir / "data").mkdir(exist_ok=True)
            context = Context.from_app(build_app_from_config(config))
            atexit.register(context.close)
            _contexts[key] = context
        return _contexts[key]


def tls_verify(settings: Settings) -> Any:
    """What an HTTPS client of the servers verifies against: the facility's CA
    (``server.ca_file``) or, without one, the system's store (``True``)."""
    if settings.server.ca_file is None:
        return True
    import ssl

    return ssl.create_default_context(cafile=str(settings.server.ca_file))


@contextlib.contextmanager
def open_catalog(settings: Settings) -> Iterator[Catalog]:
    """Yield the catalog's clients; closes what it opened on exit.

    With ``settings.catalog.url`` set, connects to that server (with the API key, if any), and a
    server that does not answer raises :class:`~corrflow.catalog.spool.CatalogUnavailableError`
    naming it; otherwise serves the embedded SQLite catalog in-process (its app built once per process).
    """
    from tiled.client import from_context, from_uri

    if settings.catalog.url:
        import httpx

        from corrflow.catalog.spool import CatalogUnavailableError

        try:
            root = from_uri(settings.catalog.url, api_key=secret_value(settings.catalog.api_key), verify=tls_verify(settings))
        except httpx.TransportError as exc:
            raise CatalogUnavailableError(
                f"the catalog at {settings.catalog_address} does not answer ({type(exc).__name__}: {exc}); nothing was acquired"
            ) from None
        try:
            yield Catalog(root, _child(root, RUNS_KEY, BLUESKY_CATALOG_SPECS), _child(root, PROCESSED_KEY, None))
        finally:
            root.context.close()
        return

    root = from_context(_in_process_context(settings))
    yield Catalog(root, _child(root, RUNS_KEY, BLUESKY_CATALOG_SPECS), _child(root, PROCESSED_KEY, None))


def register_product(
    catalog: Catalog, path: Path, *, key: str, dataset: str, metadata: dict[str, Any]
) -> Container:
    """Register an HDF5 product in place (external asset) under ``/processed/<key>`` with its metadata.

    Call it only after the file is complete and verified: the catalog never lists a partial product.
    """
    return catalog.processed.register(
        Path(path).absolute(), key=key, mimetype="application/x-hdf5", parameters={"dataset": dataset}, metadata=metadata
    )


def product_key(run_uid: str, kind: str) -> str:
    """Key under ``/processed`` of the ``kind`` product (volume, registration, ...) of run ``run_uid``."""
    if not run_uid or not kind:
        raise ValueError(f"a product key needs a run uid and a kind, got {run_uid!r}, {kind!r}")
    return f"{run_uid}-{kind}"


def plain(value: Any) -> Any:
    """Tiled's metadata views (mappings, sequences) as plain dicts and lists, for JSON and comparisons."""
    from collections.abc import Mapping, Sequence

    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    return value


def record_product(catalog: Catalog, key: str, metadata: dict[str, Any]) -> Container:
    """A product that is a record, not a file (a transfer, a registration, a hand-off, a report):
    a container ``/processed/<key>`` whose metadata is the record.

    A stage that runs again for the same run (a retried flow run) replaces its earlier record, so
    the catalog holds what the last, complete run of the stage found.
    """
    if key in catalog.processed:
        node = catalog.processed[key]
        node.replace_metadata(metadata=metadata)
        return node
    return catalog.processed.create_container(key, metadata=metadata)


def record_lifecycle(run: Any, event: str, entries: list[dict[str, Any]]) -> None:
    """Append ``entries`` to the run's ``lifecycle.<event>`` list in the catalog.

    What happened to a run's files after it was catalogued (``pruned``: deleted after a verified
    copy; ``set_aside``: moved out of the data tree because the run failed writing them), so a
    reader learns where the files went instead of meeting a missing file.
    """
    lifecycle = dict(run.metadata.get("lifecycle") or {})
    lifecycle[event] = [*lifecycle.get(event, []), *entries]
    run.update_metadata(metadata={"lifecycle": lifecycle})


def _copy_one_shot_cached_map(self):
    """A copy with its own key -> client table (``copy.copy`` default shares it)."""
    clone = object.__new__(type(self))
    clone._OneShotCachedMap__lock = threading.Lock()
    clone._OneShotCachedMap__mapping = dict(self._OneShotCachedMap__mapping)
    return clone


def _isolate_structure_client_copies() -> None:
    """Work around an upstream bug that switches every run read in this process to the v2 layout.

    ``BlueskyRunV3.v2`` (and so ``.v1``) does ``copy.copy(structure_clients).set("BlueskyRun", ...)``;
    tiled's ``OneShotCachedMap`` has no ``__copy__``, so the copy shares the process-wide default table
    and, after any ``.v1``/``.v2`` access, ``run["primary"][key]`` raises KeyError for every run read
    later (the stream then shows only data/timestamps/config). A real copy keeps the switch local.
    """
    from tiled.utils import OneShotCachedMap

    if "__copy__" not in vars(OneShotCachedMap):
        OneShotCachedMap.__copy__ = _copy_one_shot_cached_map


_isolate_structure_client_copies()


def tiled_writer(client: Container, settings: Settings):
    """A ``TiledWriter`` callback for a RunEngine, batched as configured (see docs/STACK.md timings)."""
    from bluesky_tiled_plugins import TiledWriter

    return TiledWriter(client, batch_size=settings.catalog.batch_size)


def external_file_paths(run: Any) -> list[Path]:
    """Local paths of the external (detector) files a Bluesky run references, in stream order.

    Reads the stream resources of the run's documents (via the catalog), so the list is what the
    catalog knows, not what happens to be on disk.
    """
    paths: list[Path] = []
    for name, doc in run.documents():
        if name == "stream_resource":
            uri = doc["uri"]
            prefix = "file://localhost"
            if not uri.startswith(prefix):
                raise ValueError(f"stream resource {doc['uid']} is not a local file: {uri}")
            path = Path(uri[len(prefix) :])
            if path not in paths:
                paths.append(path)
    return paths
