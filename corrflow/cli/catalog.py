"""`corrflow catalog reconcile`: close the catalog entries of acquisitions whose process died."""

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
