"""The ``corrflow`` command line.

Settings are loaded and validated once, before anything else happens; a wrong setting ends the
command with a message naming it. Prefect reads its own configuration at import, so the
environment derived from the settings is applied before any flow module is imported.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Annotated, Any

import typer

from corrflow.cli.common import ConfigOption, DataRootOption, console, load
from corrflow.config.settings import Settings, activate

app = typer.Typer(
    name="corrflow",
    help="Correlative beamline + microscope experiments: bluesky plans, Prefect flows, Tiled catalog.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_sub_apps() -> None:
    from corrflow.cli import catalog as cli_catalog, deploy as cli_deploy, queue as cli_queue, server as cli_server
    from corrflow.cli.sim import sim_app

    app.add_typer(sim_app, name="sim")
    app.add_typer(cli_catalog.app, name="catalog")
    app.add_typer(cli_deploy.app, name="deploy")
    app.add_typer(cli_server.app, name="server")
    app.add_typer(cli_queue.app, name="queue")


_register_sub_apps()


def _prepare_runtime(settings: Settings) -> None:
    """Directories and Prefect's environment; must run before Prefect is imported."""
    settings.ensure_directories()
    os.environ.update(settings.prefect_environment())
    # The progress bars say what runs; Prefect's per-run INFO lines still reach its server and UI.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # distributed logs a normal cluster shutdown at INFO, with a traceback; it configures its own
    # loggers from dask's config when imported, so the level is set there.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # The flows this process runs use exactly these settings, never a second reading of the environment.
    activate(settings)


@app.command()
def demo(
    config: ConfigOption = None,
    data_root: DataRootOption = None,
    sample: Annotated[str, typer.Option(help="Sample name")] = "sim-sample-01",
    projections: Annotated[int, typer.Option(min=2, help="Number of projections over 180 deg")] = 180,
    across_facilities: Annotated[
        bool,
        typer.Option(
            "--across-facilities",
            help="Run the chain as deployed: a Prefect and a Tiled server on loopback, one worker per site, "
            "the stages on their sites' pools (stopped at the end)",
        ),
    ] = False,
) -> None:
    """Run a whole simulated correlative experiment: tomography -> transfer -> reconstruction ->
    volume to the microscope -> micrograph -> registration -> ROI hand-off -> report."""
    settings = load(config, data_root)
    from corrflow.operations.locks import DataRootBusy, data_root_lock

    try:
        with data_root_lock(settings.data_root, what="corrflow demo"):
            _demo(settings, sample=sample, projections=projections, across_facilities=across_facilities)
    except DataRootBusy as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _demo(settings: Settings, *, sample: str, projections: int, across_facilities: bool) -> None:
    _prepare_runtime(settings)
    from corrflow.flows.models import DEFAULT_SAMPLE, DEFAULT_TOMOGRAPHY, ExperimentRequest

    try:
        request = ExperimentRequest(
            sample=DEFAULT_SAMPLE.model_copy(update={"name": sample}),
            tomography=DEFAULT_TOMOGRAPHY.model_validate({**DEFAULT_TOMOGRAPHY.model_dump(), "num_projections": projections}),
        )
    except ValueError as exc:
        console.print(f"[red]invalid demo parameters:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"corrflow demo: data under [bold]{settings.data_root}[/bold]")
    # SIGTERM ends the demo as Ctrl-C does: every process it started is stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    if across_facilities:
        summary = _demo_across_facilities(settings, request)
    else:
        from corrflow.flows.pipeline import correlative_experiment
        from corrflow.flows.report import read_summary
        from corrflow.report.progress import StageProgress

        with StageProgress(console) as progress:
            products = correlative_experiment(request=request)
            progress.finish()
        summary = read_summary(settings, products.tomography.run_uid)
    print_summary(summary)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _demo_across_facilities(settings: Settings, request: Any) -> dict[str, Any]:
    from corrflow.flows.pipeline import ChainError, run_on_workers
    from corrflow.operations.server import ServerError, local_facility, prefect_client

    if "database" not in settings.server.model_fields_set:
        # One machine, no set-up: the servers keep their data in SQLite files unless told otherwise.
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"database": "sqlite"})})
    console.print("starting a Prefect and a Tiled server, the deployments and one worker per site (loopback) ...")
    try:
        with local_facility(settings) as facility, prefect_client(facility.settings):
            console.print(f"Prefect UI at {facility.settings.prefect.api_url.removesuffix('/api')}; the chain starts at the beamline")
            try:
                outcome = run_on_workers(facility.settings, request)
            except ChainError as exc:
                console.print(f"[red]{exc}[/red]\n{facility.log_tails()}")
                raise typer.Exit(1) from None
    except ServerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"chain across facilities: {outcome.wall_s:.1f} s from the trigger to the report")
    handovers = [None, *outcome.handovers_s()]
    for run, handover in zip(outcome.site_runs, handovers):
        latency = "n/a" if run.start_latency_s is None else f"{run.start_latency_s:.1f} s"
        duration = "n/a" if run.ended_s is None or run.started_s is None else f"{run.ended_s - run.started_s:.1f} s"
        after = "" if handover is None else f", {handover:.1f} s after the previous site's run ended"
        console.print(f"  {run.site:10s} {run.name}: started {latency} after its trigger{after}; ran {duration}")
    return outcome.summary


def print_summary(summary: dict[str, Any]) -> None:
    """The figures a person checks first, and where the summary and the report are."""
    from corrflow.flows.report import describe_registration

    table = {
        "run uids": ", ".join([summary["run_uids"]["tomography"], summary["run_uids"]["micrograph"]]),
        "raw NXtomo": summary["raw_nxtomo_path"],
        "volume": summary["volume_path"],
        "registration": describe_registration(summary["registration"]),
        "ROI hand-off": _handoff_line(summary["roi_handoff"]),
        "report": summary["report_png"],
    }
    if summary.get("reconstruction_error"):
        table["reconstruction NRMSE vs phantom"] = f"{summary['reconstruction_error']['nrmse']:.3f}"
        table["registration error"] = f"{summary['registration_error']['rms_um']:.2f} um RMS"
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
    settings = load(config, data_root)
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
    settings = load(config, data_root)
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
