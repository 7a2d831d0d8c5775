"""The ``corrflow`` command line.

Settings are loaded and validated once, before anything else happens; a wrong setting ends the
command with a message naming it. Prefect reads its own configuration at import, so the
environment derived from the settings is applied before any flow module is imported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from corrflow.config.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="corrflow",
    help="Correlative beamline + microscope experiments: bluesky plans, Prefect flows, Tiled catalog.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _register_sub_apps() -> None:
    from corrflow.cli import catalog as cli_catalog, deploy as cli_deploy, queue as cli_queue, server as cli_server
    from corrflow.cli.sim import sim_app

    app.add_typer(sim_app, name="sim")
    app.add_typer(cli_catalog.app, name="catalog")
    app.add_typer(cli_deploy.app, name="deploy")
    app.add_typer(cli_server.app, name="server")
    app.add_typer(cli_queue.app, name="queue")


_register_sub_apps()

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (else $CORRFLOW_CONFIG, env, defaults)")
]
DataRootOption = Annotated[Path | None, typer.Option("--data-root", help="Root of all local data (overrides settings)")]


def _settings(config: Path | None, data_root: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if data_root is not None:
        overrides["data_root"] = data_root
    try:
        settings = load_settings(config, **overrides)
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    return settings


def _prepare_runtime(settings: Settings) -> None:
    """Directories and Prefect's environment; must run before Prefect is imported."""
    settings.ensure_directories()
    os.environ.update(settings.prefect_environment())
    # The progress bars say what runs; Prefect's per-run INFO lines still reach its server and UI.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # distributed logs a normal cluster shutdown at INFO, with a traceback; it configures its own
    # loggers from dask's config when imported, so the level is set there.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # Flows load settings from the environment in their own process; pin them to these.
    os.environ["CORRFLOW_DATA_ROOT"] = str(settings.data_root)


@app.command()
def demo(
    config: ConfigOption = None,
    data_root: DataRootOption = None,
    sample: Annotated[str, typer.Option(help="Sample name")] = "sim-sample-01",
    projections: Annotated[int, typer.Option(min=2, help="Number of projections over 180 deg")] = 180,
) -> None:
    """Run a whole simulated correlative experiment: tomography -> transfer -> reconstruction ->
    micrograph -> registration -> ROI hand-off, and write a summary JSON and a PNG report."""
    settings = _settings(config, data_root)
    _prepare_runtime(settings)
    from corrflow.report.progress import StageProgress
    from corrflow.flows.experiment import correlative_experiment
    from corrflow.flows.models import Sample, TomographyParameters

    try:
        sample_model = Sample(name=sample)
        tomo = TomographyParameters(num_projections=projections)
    except ValueError as exc:
        console.print(f"[red]invalid demo parameters:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"corrflow demo: data under [bold]{settings.data_root}[/bold]")
    with StageProgress(console) as progress:
        summary = correlative_experiment(sample=sample_model, tomography=tomo)
        progress.finish()
    table = {
        "run uids": ", ".join(summary["run_uids"].values()),
        "raw NXtomo": summary["raw_nxtomo_path"],
        "volume": summary["volume_path"],
        "reconstruction NRMSE vs phantom": f"{summary['reconstruction_error']['nrmse']:.3f}",
        "registration error": f"{summary['registration_error']['rms_um']:.2f} um RMS",
        "ROI hand-off": _handoff_line(summary["roi_handoff"]),
        "report": summary["report_png"],
    }
    for key, value in table.items():
        console.print(f"  {key:32s} {value}")
    typer.echo(f"summary: {summary['summary_path']}")


def _handoff_line(handoff: dict[str, Any]) -> str:
    where = ", ".join(f"{v:.0f}" for v in handoff["roi_sample_um"])
    line = f"feature at ({where}) um -> stage ({handoff['stage_x_um']:.1f}, {handoff['stage_y_um']:.1f}) um"
    if handoff.get("true_error_um") is not None:
        line += f", error {handoff['true_error_um']:.2f} um"
    return line


@app.command("dry-run")
def dry_run(
    plan: Annotated[str, typer.Argument(help="Plan name (see `corrflow plans`)")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Plan parameter as NAME=VALUE (repeatable)")
    ] = None,
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Validate a plan, print its estimate, run it on simulated devices and summarise the messages."""
    settings = _settings(config, data_root)
    from corrflow.acquisition.dryrun import DryRunError, dry_run_plan

    try:
        report = dry_run_plan(settings, plan, _parse_params(param or []))
    except DryRunError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2, default=str))


@app.command()
def plans() -> None:
    """List the plans `dry-run` knows, with their parameters."""
    from corrflow.acquisition.dryrun import describe_plans

    typer.echo(json.dumps(describe_plans(), indent=2))


@app.command("settings")
def show_settings(config: ConfigOption = None, data_root: DataRootOption = None) -> None:
    """Print the effective, validated settings."""
    settings = _settings(config, data_root)
    typer.echo(settings.model_dump_json(indent=2))


def _parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            console.print(f"[red]--param expects NAME=VALUE, got {pair!r}[/red]")
            raise typer.Exit(2)
        params[name.strip()] = value.strip()
    return params


def main() -> None:
    logging.getLogger("caproto").setLevel(logging.WARNING)
    app(prog_name="corrflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
