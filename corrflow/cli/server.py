"""`corrflow server up` and `corrflow server worker SITE`: production mode from the settings."""

from __future__ import annotations

import os
import signal
import time
from typing import Annotated

import typer

from corrflow.cli.common import ConfigOption, DataRootOption, console, load
from corrflow.config.settings import SITES

app = typer.Typer(help="Production mode: Prefect + Tiled servers on PostgreSQL, one worker per site.", no_args_is_help=True, add_completion=False)


@app.command()
def up(
    config: ConfigOption = None,
    data_root: DataRootOption = None,
    workers: Annotated[bool, typer.Option("--workers/--no-workers", help="Also start one worker per site")] = False,
    tiled: Annotated[bool, typer.Option("--tiled/--no-tiled", help="Also start the Tiled catalog server")] = True,
) -> None:
    """Start the Prefect server (and the Tiled server) on PostgreSQL; stop them on Ctrl-C / SIGTERM."""
    settings = load(config, data_root)
    settings.ensure_directories()
    from corrflow.operations.server import ServerError, client_settings, prefect_api_url, server_dir, servers_up, start_worker, tiled_url, write_settings_file

    stop = {"now": False}

    def _stop(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        with servers_up(settings, tiled=tiled) as started:
            settings_file = write_settings_file(client_settings(settings))
            site_workers = [start_worker(settings, site) for site in SITES] if workers else []
            console.print(f"Prefect API  {prefect_api_url(settings)}  (dashboard: {prefect_api_url(settings).removesuffix('/api')})")
            if tiled:
                keys = (
                    f"keys in {server_dir(settings)}/tiled_<name>_key: writer-<site> per site, writer for operators, reader"
                    if settings.server.auth_enabled
                    else f"key in {server_dir(settings) / 'tiled_api_key'}"
                )
                console.print(f"Tiled        {tiled_url(settings)}  ({keys}, unless catalog.api_key is set)")
            console.print(f"settings for workers and clients: CORRFLOW_CONFIG={settings_file}")
            console.print(f"logs in {server_dir(settings) / 'logs'}; Ctrl-C stops everything")
            try:
                while not stop["now"]:
                    for proc in [*started.values(), *site_workers]:
                        if not proc.alive():
                            raise ServerError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
                    time.sleep(1.0)
            finally:
                for worker in site_workers:
                    worker.stop()
    except ServerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@app.command("revoke-key")
def revoke_key(
    name: Annotated[str, typer.Argument(help="writer-beamline, writer-compute, writer-microscope, writer or reader")],
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Revoke one Tiled key (e.g. a site's writer after a host was compromised); `server up` issues a new one."""
    settings = load(config, data_root)
    from corrflow.operations.server import ServerError, revoke_tiled_key

    try:
        revoke_tiled_key(settings, name)
    except ServerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"revoked the Tiled {name} key; start the servers again (`corrflow server up`) to issue a new one")


@app.command()
def worker(
    site: Annotated[str, typer.Argument(help="beamline, compute or microscope")],
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Run a process worker on the site's work pool, in the foreground (replaces this process)."""
    if site not in SITES:
        console.print(f"[red]site must be one of {', '.join(SITES)}, got {site!r}[/red]")
        raise typer.Exit(2)
    settings = load(config, data_root)
    settings.ensure_directories()
    from corrflow.operations.server import _bin, _clean_environment, client_environment

    env = _clean_environment(client_environment(settings, site))
    command = [_bin("prefect"), "worker", "start", "--pool", settings.work_pool(site), "--type", "process", "--name", f"corrflow-{site}"]
    console.print(" ".join(command))
    os.execvpe(command[0], command, env)
