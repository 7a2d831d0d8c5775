"""The simulated facility as real EPICS IOCs: start, watch, kill and restart them, on loopback.

:class:`SimFacility` runs a Channel Access repeater bound to 127.0.0.1 and one process per IOC of
:mod:`corrflow.simulators.ioc` (stage, X-ray detector, heater, source, microscope), each on its
own free port, and gives the environment a client needs to reach them (and nothing else):
``EPICS_CA_AUTO_ADDR_LIST=NO`` and ``EPICS_CA_ADDR_LIST`` naming ``127.0.0.1:<port>`` of each IOC.
An IOC counts as started once its ``sim:PutCount`` PV answers a Channel Access read.

``corrflow sim up`` (:mod:`corrflow.cli.sim`) and the test fixtures
(`tests/epics_fixtures.py`) are thin wrappers around this class.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from corrflow.config.settings import SimulationSettings

__all__ = ["IOC_NAMES", "IocSpec", "SimFacility", "SimFacilityError", "free_port", "patched_environ"]

LOOPBACK = "127.0.0.1"
IOC_NAMES = ("stage", "xray-detector", "heater", "source", "microscope")


class SimFacilityError(RuntimeError):
    """An IOC of the simulated facility did not start, or died; the message holds its log tail."""


def free_port() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1 (Channel Access uses both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
        return port
    raise SimFacilityError("no free TCP+UDP port on 127.0.0.1")


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class IocSpec:
    """One IOC of the facility: its ``python -m corrflow.simulators.ioc`` name and PV section."""

    name: str
    instrument: Literal["beamline", "microscope"]
    section: str

    def ready_pv(self, prefix: str) -> str:
        return f"{prefix}{self.section}sim:PutCount"


SPECS: dict[str, IocSpec] = {
    "stage": IocSpec("stage", "beamline", "stage:"),
    "xray-detector": IocSpec("xray-detector", "beamline", "det:"),
    "heater": IocSpec("heater", "beamline", "tc:"),
    "source": IocSpec("source", "beamline", "src:"),
    "microscope": IocSpec("microscope", "microscope", ""),
}


class SimFacility:
    """The simulated beamline and microscope served by caproto IOCs on 127.0.0.1.

    Parameters
    ----------
    beamline_prefix, microscope_prefix
        PV prefixes of the two instruments (``settings.beamline.epics_prefix`` and
        ``settings.microscope.epics_prefix`` of a client), e.g. ``"CFSIM:BL:"``.
    simulation
        Physics of the simulated world, passed to the detector IOCs (so frames match what
        in-process simulated devices with the same settings produce).
    speed
        Factor on the nominal motor velocities (tests run the stage faster than a real one).
    heater_time_scale
        The furnace runs this many times faster than real time.
    ports
        ``{ioc name: port}`` to reuse (e.g. across test modules of one client process, whose
        Channel Access library reads its address list once); missing ones are chosen free.
    repeater_port
        Port of the loopback CA repeater; default a free one.
    log_dir
        Where each IOC's output goes (``<name>.log``); default a new temporary directory.
    python
        Interpreter that runs the IOCs.
    """

    def __init__(
        self,
        *,
        beamline_prefix: str,
        microscope_prefix: str,
        simulation: SimulationSettings | None = None,
        speed: float = 1.0,
        heater_time_scale: float = 1.0,
        ports: Mapping[str, int] | None = None,
        repeater_port: int | None = None,
        log_dir: Path | str | None = None,
        python: str = sys.executable,
    ) -> None:
        for name, prefix in (("beamline_prefix", beamline_prefix), ("microscope_prefix", microscope_prefix)):
            if not prefix or any(c.isspace() for c in prefix):
                raise ValueError(f"{name} must be a non-empty PV prefix without spaces, got {prefix!r}")
        if beamline_prefix == microscope_prefix:
            raise ValueError("beamline_prefix and microscope_prefix must differ")
        if not speed > 0 or not heater_time_scale > 0:
            raise ValueError(f"speed and heater_time_scale must be > 0, got {speed}, {heater_time_scale}")
        self.beamline_prefix = beamline_prefix
        self.microscope_prefix = microscope_prefix
        self.simulation = simulation if simulation is not None else SimulationSettings()
        self.speed = float(speed)
        self.heater_time_scale = float(heater_time_scale)
        unknown = set(ports or {}) - set(SPECS)
        if unknown:
            raise ValueError(f"ports: unknown IOC names {sorted(unknown)}; known: {list(SPECS)}")
        self.ports = {name: int((ports or {}).get(name) or free_port()) for name in SPECS}
        self.repeater_port = int(repeater_port or free_port())
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self.python = python
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._repeater: subprocess.Popen[bytes] | None = None

    @property
    def log_dir(self) -> Path:
        """Directory of the IOC logs (a new temporary directory unless given; made on first use)."""
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="corrflow-sim-"))
        return self._log_dir

    # -- addresses ---------------------------------------------------------------------------
    def prefix_of(self, name: str) -> str:
        """Instrument prefix + section of IOC ``name`` (e.g. ``"CFSIM:BL:stage:"``)."""
        spec = SPECS[name]
        base = self.beamline_prefix if spec.instrument == "beamline" else self.microscope_prefix
        return base + spec.section

    def ready_pv(self, name: str) -> str:
        """The PV polled to decide IOC ``name`` is up (its write counter)."""
        return f"{self.prefix_of(name)}sim:PutCount"

    def client_environment(self) -> dict[str, str]:
        """Channel Access variables for a client of this facility (loopback only)."""
        return {
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": " ".join(f"{LOOPBACK}:{port}" for port in self.ports.values()),
            "EPICS_CA_REPEATER_PORT": str(self.repeater_port),
            "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK,
            "EPICS_CAS_BEACON_PORT": str(self.repeater_port),
        }

    def corrflow_environment(self) -> dict[str, str]:
        """corrflow settings that make its factories build EPICS devices on this facility."""
        return {
            "CORRFLOW_BEAMLINE__MODE": "epics",
            "CORRFLOW_BEAMLINE__EPICS_PREFIX": self.beamline_prefix,
            "CORRFLOW_MICROSCOPE__MODE": "epics",
            "CORRFLOW_MICROSCOPE__EPICS_PREFIX": self.microscope_prefix,
        }

    def export_lines(self) -> str:
        """Shell ``export`` lines for a client (Channel Access and corrflow settings)."""
        env = {**self.client_environment(), **self.corrflow_environment()}
        return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())

    def _server_environment(self, name: str) -> dict[str, str]:
        return {
            **os.environ,
            **self.client_environment(),  # the X-ray detector reads the other IOCs as a client
            "EPICS_CA_SERVER_PORT": str(self.ports[name]),
            "PYTHONUNBUFFERED": "1",
            # The IOC exits when this process is gone (see corrflow.simulators.ioc.common.serve).
            "CORRFLOW_SIM_PARENT_PID": str(os.getpid()),
        }

    def command(self, name: str) -> list[str]:
        """The command line that runs IOC ``name``."""
        spec = SPECS[name]
        base = self.beamline_prefix if spec.instrument == "beamline" else self.microscope_prefix
        command = [self.python, "-m", "corrflow.simulators.ioc", name, "--prefix", base, "--port", str(self.ports[name])]
        simulation = self.simulation.model_dump_json()
        if name == "stage":
            command += ["--speed", repr(self.speed)]
        elif name == "microscope":
            command += ["--speed", repr(self.speed), "--simulation", simulation]
        elif name == "heater":
            command += ["--time-scale", repr(self.heater_time_scale), "--seed", str(self.simulation.seed)]
        elif name == "xray-detector":
            command += [
                "--simulation", simulation,
                "--stage-prefix", self.prefix_of("stage"),
                "--shutter-pv", f"{self.prefix_of('source')}shutter:State_RBV",
                "--temperature-pv", f"{self.prefix_of('heater')}Temperature_RBV",
                "--current-pv", f"{self.prefix_of('source')}RingCurrent_RBV",
            ]
        return command

    # -- processes ---------------------------------------------------------------------------
    def _start_repeater(self) -> None:
        if self._repeater is not None and self._repeater.poll() is None:
            return
        env = {**os.environ, "EPICS_CA_REPEATER_PORT": str(self.repeater_port), "CORRFLOW_SIM_PARENT_PID": str(os.getpid())}
        log = open(self.log_dir / "repeater.log", "ab")  # noqa: SIM115 - owned by the process
        self._repeater = subprocess.Popen(
            [self.python, "-c", "from corrflow.simulators.ioc.common import run_repeater; run_repeater()"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

    def start(self, names: Iterable[str] = IOC_NAMES, *, timeout_s: float = 60.0) -> None:
        """Start the repeater and the IOCs ``names`` (those not running), then wait until each answers.

        Raises
        ------
        SimFacilityError
            An IOC exited or did not answer within ``timeout_s``; its log tail is in the message.
        """
        names = list(names)
        unknown = set(names) - set(SPECS)
        if unknown:
            raise ValueError(f"unknown IOC names {sorted(unknown)}; known: {list(SPECS)}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_repeater()
        for name in names:
            if self.is_running(name):
                continue
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
            self._processes[name] = subprocess.Popen(
                self.command(name), env=self._server_environment(name), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        self.wait_ready(names, timeout_s=timeout_s)

    def wait_ready(self, names: Iterable[str], *, timeout_s: float = 60.0) -> None:
        """Poll each IOC's ready PV over Channel Access until it answers (or fail with its log)."""
        from caproto.sync.client import read

        deadline = time.monotonic() + timeout_s
        pending = list(names)
        with patched_environ(self.client_environment()):
            while pending:
                name = pending[0]
                process = self._processes.get(name)
                if process is None or process.poll() is not None:
                    raise SimFacilityError(f"IOC {name!r} is not running (exit code {process and process.returncode})\n{self.log_tail(name)}")
                try:
                    read(self.ready_pv(name), timeout=0.5, repeater=False)  # the facility runs its own
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise SimFacilityError(
                            f"IOC {name!r} did not answer {self.ready_pv(name)} within {timeout_s} s\n{self.log_tail(name)}"
                        ) from None
                    continue
                pending.pop(0)

    def is_running(self, name: str) -> bool:
        process = self._processes.get(name)
        return process is not None and process.poll() is None

    def pid(self, name: str) -> int:
        process = self._processes.get(name)
        if process is None:
            raise SimFacilityError(f"IOC {name!r} was not started")
        return process.pid

    def kill(self, name: str) -> None:
        """Kill IOC ``name`` at once (SIGKILL: no clean disconnect, as a crashed IOC host)."""
        process = self._processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, name: str, *, timeout_s: float = 5.0) -> None:
        """Stop IOC ``name`` (SIGTERM, then SIGKILL after ``timeout_s``)."""
        process = self._processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def restart(self, name: str, *, timeout_s: float = 60.0) -> None:
        """Stop (if running) and start IOC ``name`` again on the same port."""
        self.stop(name)
        self.start([name], timeout_s=timeout_s)

    def close(self) -> None:
        """Stop every IOC and the repeater."""
        for name in list(self._processes):
            self.stop(name)
        if self._repeater is not None:
            if self._repeater.poll() is None:
                self._repeater.terminate()
                try:
                    self._repeater.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._repeater.kill()
                    self._repeater.wait(timeout=5)
            self._repeater = None

    def __enter__(self) -> SimFacility:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- diagnostics -------------------------------------------------------------------------
    def log_tail(self, name: str, *, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return f"(no log at {path})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def put_counts(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """``{ioc name: client writes received}`` read from each running IOC's ``sim:PutCount``."""
        from caproto.sync.client import read

        counts = {}
        with patched_environ(self.client_environment()):
            for name in names if names is not None else list(self._processes):
                # caproto's sync client sends one UDP search and never repeats it (a CA client library
                # does): a datagram lost on a busy machine is retried here, not reported as a count.
                for attempt in range(3):
                    try:
                        counts[name] = int(read(self.ready_pv(name), timeout=2.0, repeater=False).data[0])
                        break
                    except TimeoutError:
                        if attempt == 2 or not self.is_running(name):
                            raise
        return counts

    def describe(self) -> str:
        """A human-readable summary: each IOC, its port and PV prefix."""
        lines = [f"CA repeater      127.0.0.1:{self.repeater_port}"]
        for name in SPECS:
            state = "running" if self.is_running(name) else "stopped"
            lines.append(f"{name:16s} 127.0.0.1:{self.ports[name]:<6d} {self.prefix_of(name):24s} {state}")
        return "\n".join(lines)
