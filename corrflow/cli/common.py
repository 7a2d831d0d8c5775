"""What the facility CLI sub-apps (deploy, server, queue) share: settings and the Prefect environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from corrflow.config.settings import Settings, SettingsError, load_settings

console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (else $CORRFLOW_CONFIG, env, defaults)")
]
DataRootOption = Annotated[Path | None, typer.Option("--data-root", help="Root of all local data (overrides settings)")]


def load(config: Path | None, data_root: Path | None) -> Settings:
    """Validated settings, or exit 2 with the message naming each wrong setting."""
    overrides: dict[str, Any] = {}
    if data_root is not None:
        overrides["data_root"] = data_root
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def use_production_prefect(settings: Settings) -> None:
    """Point this process's Prefect client at the production server; call before importing prefect."""
    from corrflow.operations.server import client_environment

    settings.ensure_directories()
    os.environ.update(client_environment(settings))


def parse_value(text: str) -> Any:
    """A parameter value: JSON if it parses (numbers, booleans, lists), else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``a=1 b.c=2`` -> ``{"a": 1, "b": {"c": 2}}`` (dotted names fill nested models)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            console.print(f"[red]--param expects NAME=VALUE, got {pair!r}[/red]")
            raise typer.Exit(2)
        target = params
        *parents, leaf = name.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                console.print(f"[red]--param {name}: {parent} is given both as a value and as a group[/red]")
                raise typer.Exit(2)
        target[leaf] = parse_value(value.strip())
    return params
