"""`corrflow queue submit|list|cancel`: the experiment queue of each instrument."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer

from corrflow.cli.common import ConfigOption, DataRootOption, console, load, parse_params, use_production_prefect

app = typer.Typer(help="Experiment queue: submit with a priority, list, cancel.", no_args_is_help=True, add_completion=False)


@app.command()
def submit(
    plan: Annotated[str, typer.Argument(help="tomography (beamline) or micrograph (microscope)")],
    sample: Annotated[str, typer.Option("--sample", help="Sample name")],
    proposal: Annotated[str, typer.Option(help="Proposal id")] = "sim-0001",
    user: Annotated[str, typer.Option(help="Submitting user")] = "local-user",
    priority: Annotated[int, typer.Option(help="Higher runs first; equal priorities run in submission order")] = 0,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="NAME=VALUE, dotted for nested (tomography.num_projections=90)")] = None,
    no_trigger: Annotated[bool, typer.Option("--no-trigger", help="Only queue; do not wake the dispatcher")] = False,
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Validate and queue an experiment; prints its queue id."""
    settings = load(config, data_root)
    settings.ensure_directories()
    if settings.prefect.api_url:
        use_production_prefect(settings)  # the submit wakes the site's dispatcher deployment
    from corrflow.flows.experiment_queue import submit_experiment
    from corrflow.operations.queue import QueueError

    try:
        entry = submit_experiment(
            settings,
            plan=plan,
            parameters=parse_params(param or []),
            sample={"name": sample, "proposal": proposal, "user": user},
            priority=priority,
            submitted_by=user,
            trigger=not no_trigger,
        )
    except QueueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"id": entry.id, "instrument": entry.instrument, "priority": entry.priority, "state": entry.state}))


@app.command("list")
def list_entries(
    instrument: Annotated[str | None, typer.Option(help="Only this instrument")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include finished entries")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Entries in the order they will run (running first)."""
    settings = load(config, data_root)
    from corrflow.operations.queue import ExperimentQueue

    entries = ExperimentQueue.from_settings(settings).list(instrument=instrument, include_finished=all_)
    if as_json:
        for e in entries:
            typer.echo(json.dumps({"id": e.id, "instrument": e.instrument, "priority": e.priority, "plan": e.plan, "sample": e.sample.get("name"), "state": e.state, "message": e.message}))
        return
    typer.echo(f"{'id':>5}  {'instrument':12s} {'prio':>4}  {'plan':11s} {'sample':20s} {'state':11s} submitted")
    for e in entries:
        when = datetime.fromtimestamp(e.submitted_at).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{e.id:>5}  {e.instrument:12s} {e.priority:>4}  {e.plan:11s} {str(e.sample.get('name')):20s} {e.state:11s} {when}")


@app.command()
def cancel(
    entry_id: Annotated[int, typer.Argument(help="Queue id (see `corrflow queue list`)")],
    config: ConfigOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Withdraw a queued experiment, or cancel a running one through its flow run."""
    settings = load(config, data_root)
    from corrflow.operations.queue import ExperimentQueue, QueueError

    queue = ExperimentQueue.from_settings(settings)
    try:
        entry = queue.get(entry_id)
        if entry.state == "running":
            if not (settings.prefect.api_url and entry.flow_run_id):
                raise QueueError(f"entry {entry_id} runs in-process (no flow run to cancel); stop its dispatcher")
            use_production_prefect(settings)
            from corrflow.acquisition.cancellation import cancel_flow_run

            cancel_flow_run(entry.flow_run_id)
            entry = queue.finish(entry_id, "cancelled", message="cancelled by user while running")
        else:
            entry = queue.cancel(entry_id)
    except QueueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"id": entry.id, "state": entry.state}))
