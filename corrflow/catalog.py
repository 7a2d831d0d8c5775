"""The Tiled catalog: where every run's documents land and where they are read back.

Embedded default: an in-process Tiled app over SQLite under ``<data_root>/catalog`` (no socket,
no server to start). Production: a Tiled server (``settings.catalog.url`` + API key), e.g. one
started with ``tiled serve config`` on the file :func:`catalog_config` describes.

The same configuration serves both, so a run written in-process reads back the same way from a
server: as a Tiled ``BlueskyRun`` and through databroker's v1 API (``client.v1[uid]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corrflow.settings import Settings

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
                    "specs": BLUESKY_CATALOG_SPECS,
                },
            }
        ],
        "media_types": BLUESKY_MEDIA_TYPES,
    }


@contextlib.contextmanager
def open_catalog(settings: Settings) -> Iterator[Container]:
    """Yield a Tiled client for the catalog; closes what it opened on exit.

    With ``settings.catalog.url`` set, connects to that server (with the API key, if any);
    otherwise serves the embedded SQLite catalog in-process (~6 s to ready, mostly imports).
    """
    from tiled.client import from_context, from_uri

    if settings.catalog.url:
        client = from_uri(settings.catalog.url, api_key=settings.catalog.api_key)
        try:
            yield client
        finally:
            client.context.close()
        return

    from tiled.client.context import Context
    from tiled.server.app import build_app_from_config

    settings.catalog_dir.mkdir(parents=True, exist_ok=True)
    (settings.catalog_dir / "data").mkdir(exist_ok=True)
    app = build_app_from_config(catalog_config(settings))
    context = Context.from_app(app)
    try:
        yield from_context(context)
    finally:
        context.close()


def tiled_writer(client: Container, settings: Settings):
    """A ``TiledWriter`` callback for a RunEngine, batched as configured (see STACK.md timings)."""
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
