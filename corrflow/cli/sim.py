"""``corrflow sim ...``: the simulated facility served as EPICS IOCs on 127.0.0.1.

``corrflow sim up`` starts a loopback Channel Access repeater and one caproto IOC per instrument
section (stage, X-ray detector, furnace, source, microscope), each on its own free port, prints
the environment a client needs (``export EPICS_CA_...`` and ``CORRFLOW_..._MODE=epics``), and
keeps them running until interrupted (Ctrl-C or SIGTERM), then stops them all.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

sim_app = typer.Typer(
    name="sim", help="The simulated facility as EPICS IOCs (caproto, loopback only).", no_args_is_help=True
)

__all__ = ["sim_app"]


@sim_app.command("up")
def up(
    prefix: Annotated[str, typer.Option(help="PV prefix of the facility; instruments are <prefix>BL: and <prefix>SEM:")] = "CFSIM:",
    speed: Annotated[float, typer.Option(min=0.001, help="factor on the nominal motor velocities")] = 1.0,
    heater_time_scale: Annotated[float, typer.Option(min=0.001, help="the furnace runs this many times faster than real time")] = 1.0,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="start only these IOCs (repeatable): stage, xray-detector, heater, source, microscope")
    ] = None,
    log_dir: Annotated[Path | None, typer.Option(help="directory of the IOC logs (default: a temporary directory)")] = None,
    env_file: Annotated[Path | None, typer.Option(help="also write the export lines to this file (to `source` it)")] = None,
    duration_s: Annotated[float | None, typer.Option(help="stop after this many seconds (default: until interrupted)")] = None,
) -> None:
    """Start the simulated facility's IOCs and print the EPICS environment to use them."""
    from corrflow.config.settings import load_settings
    from corrflow.operations.sim_facility import IOC_NAMES, SimFacility, SimFacilityError

    names = list(only) if only else list(IOC_NAMES)
    unknown = sorted(set(names) - set(IOC_NAMES))
    if unknown:
        typer.echo(f"unknown IOC name(s) {unknown}; known: {list(IOC_NAMES)}", err=True)
        raise typer.Exit(2)
    if not prefix or any(c.isspace() for c in prefix):
        typer.echo(f"--prefix must be a PV prefix without spaces, got {prefix!r}", err=True)
        raise typer.Exit(2)
    facility = SimFacility(
        beamline_prefix=f"{prefix}BL:",
        microscope_prefix=f"{prefix}SEM:",
        simulation=load_settings().simulation,
        speed=speed,
        heater_time_scale=heater_time_scale,
        log_dir=log_dir,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with facility:
        try:
            facility.start(names)
        except SimFacilityError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
        exports = facility.export_lines()
        if env_file is not None:
            env_file.write_text(exports + "\n")
        typer.echo("# corrflow simulated facility: IOCs on 127.0.0.1")
        for line in facility.describe().splitlines():
            typer.echo(f"# {line}")
        typer.echo(f"# logs: {facility.log_dir}")
        typer.echo(exports, color=False)
        typer.echo("# Ctrl-C stops the facility.", err=True)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            dead = [name for name in names if not facility.is_running(name)]
            if dead:
                typer.echo(f"IOC(s) {dead} exited; stopping the facility.\n{facility.log_tail(dead[0])}", err=True)
                raise typer.Exit(1)
            stop.wait(0.5)
    typer.echo("# simulated facility stopped", err=True)


@sim_app.command("iocs")
def iocs() -> None:
    """List the IOCs of the simulated facility and how to run one by hand."""
    from corrflow.operations.sim_facility import SPECS

    for name, spec in SPECS.items():
        typer.echo(f"{name:14s} PVs <instrument prefix>{spec.section or ''}...   python -m corrflow.simulators.ioc {name} --prefix P")
