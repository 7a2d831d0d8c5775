"""`corrflow catalog reconcile`: close the catalog entries of acquisitions whose process died;
`corrflow catalog replay`: write the runs spooled while the catalog was down."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated

import typer

from corrflow.cli.common import ConfigOption, DataRootOption, console, load, use_production_prefect

app = typer.Typer(help="The Tiled catalog of runs and products.", no_args_is_help=True, add_completion=False)


@app.command()
def reconcile(
    instrument: Annotated[str | None, typer.Option(help="Only runs of this instrument (default: all)")] = None,
    grace_s: Annotated[float, typer.Option("--grace-s", min=0, help="Leave runs younger than this alone (s)")] = 60.0,
    unverifiable_after_h: Annotated[
        float | None,
        typer.Option(
            "--unverifiable-after-h", min=0,
            help="Also close runs whose producer cannot be checked (other host, no flow run) once this old (h)",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be closed")] = False,
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Give every run left without a stop document by a dead process a stop document ``fail`` with the reason.

    Prints one JSON line per run without a stop document (closed, would close, or kept and why),
    then a summary on stderr. Events and files are never changed.
    """
    settings = load(config, data_root)
    if settings.prefect.api_url:
        # Production: flow-run states from the Prefect server, runs in the Tiled server.
        use_production_prefect(settings)
        from corrflow.operations.server import production_settings

        settings = production_settings(settings)
    else:
        settings.ensure_directories()
        os.environ.update(settings.prefect_environment())
    from corrflow.catalog.tiled import open_catalog
    from corrflow.catalog.reconcile import reconcile_runs

    started = time.perf_counter()
    with open_catalog(settings) as catalog:
        entries = reconcile_runs(
            catalog,
            instrument=instrument,
            grace_s=grace_s,
            unverifiable_after_s=None if unverifiable_after_h is None else unverifiable_after_h * 3600.0,
            dry_run=dry_run,
        )
    seconds = time.perf_counter() - started
    for entry in entries:
        typer.echo(json.dumps(entry.as_dict()))
    counts = {action: sum(e.action == action for e in entries) for action in ("closed", "would close", "kept")}
    console.print(
        f"{len(entries)} run(s) without a stop document: {counts['closed']} closed, "
        f"{counts['would close']} would be closed, {counts['kept']} kept ({seconds:.2f} s)"
    )


@app.command()
def replay(config: ConfigOption = None, data_root: DataRootOption = None) -> None:
    """Write to the catalog every run spooled on this host while it was down (``<data_root>/spool``).

    Each finished run replaces whatever part of it the catalog holds, and its spool file is removed
    once the catalog has its stop document. A run spooled without a stop (still acquiring, or its
    process died) is written as far as it goes and keeps its file. Prints one JSON line per run;
    exits 1 if any run could not be written.
    """
    settings = load(config, data_root)
    if settings.prefect.api_url:
        from corrflow.operations.server import production_settings

        settings = production_settings(settings)
    from corrflow.catalog.spool import read_spool_file, replay_spool_file, spooled_runs
    from corrflow.catalog.tiled import open_catalog, tiled_writer

    paths = spooled_runs(settings.spool_dir)
    failed = 0
    with open_catalog(settings) as catalog:
        for path in paths:
            documents = list(read_spool_file(path))
            stopped = bool(documents) and documents[-1][0] == "stop"
            try:
                uid = replay_spool_file(path, catalog.runs, tiled_writer(catalog.runs, settings))
            except Exception as exc:  # reported per run; the spool file stays
                failed += 1
                typer.echo(json.dumps({"spool": str(path), "action": "failed", "error": f"{type(exc).__name__}: {exc}"}))
                continue
            typer.echo(json.dumps({"uid": uid, "action": "replayed" if stopped else "replayed (no stop yet)",
                                   "documents": len(documents), "spool": str(path), "kept": path.exists()}))
    console.print(f"{len(paths)} spooled run(s) for the catalog at {settings.catalog_address}: {len(paths) - failed} written, {failed} failed")
    if failed:
        raise typer.Exit(1)
