"""`corrflow deploy`: work pools, instrument concurrency limits, site deployments, zombie automation."""

from __future__ import annotations

import typer

from corrflow.cli.common import ConfigOption, DataRootOption, console, load, use_production_prefect

app = typer.Typer(help="Create or update work pools, limits, deployments and automations (idempotent).", add_completion=False)


@app.callback(invoke_without_command=True)
def deploy(config: ConfigOption = None, data_root: DataRootOption = None) -> None:
    """Bring the Prefect server to the state of deployments/*.yaml; a second run changes nothing."""
    settings = load(config, data_root)
    use_production_prefect(settings)
    from corrflow.operations.deploy import bootstrap
    from corrflow.operations.server import prefect_api_url

    console.print(f"deploying to {prefect_api_url(settings)}")
    try:
        actions = bootstrap(settings)
    except (RuntimeError, ValueError) as exc:
        console.print(f"[red]deploy failed: {exc}[/red]")
        raise typer.Exit(1) from None
    for action in actions:
        typer.echo(str(action))
    changed = sum(a.outcome != "unchanged" for a in actions)
    console.print(f"{changed} changed, {len(actions) - changed} unchanged")
