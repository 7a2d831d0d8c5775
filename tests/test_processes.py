"""Nothing outlives the command that started it: SIGTERM to `corrflow demo --across-facilities` in
the middle of its chain, and to `corrflow sim up`, ends every process they started (servers,
workers, flow runs, IOCs, the Channel Access repeater). Slow: real servers and IOCs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

CORRFLOW = str(Path(sys.executable).with_name("corrflow"))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # ended (or a zombie) meanwhile
        return []


def _still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def _terminate_and_wait(command: subprocess.Popen, started: list[psutil.Process], *, timeout_s: float) -> tuple[float, list]:
    """SIGTERM ``command``; seconds until it and ``started`` are gone, and what is left after ``timeout_s``."""
    sent = time.monotonic()
    command.send_signal(signal.SIGTERM)
    deadline = sent + timeout_s
    while time.monotonic() < deadline:
        if command.poll() is not None and not _still_running(started):
            return time.monotonic() - sent, []
        time.sleep(0.1)
    return time.monotonic() - sent, [p.pid for p in _still_running(started)]


def _wait_for_line(path: Path, text: str, command: subprocess.Popen, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if command.poll() is not None:
            pytest.fail(f"exited {command.returncode} before {text!r}:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} within {timeout_s} s:\n{path.read_text(errors='replace')[-3000:]}")


def _start_then_terminate(command: list[str], tmp_path: Path, *, ready: str, settle_s: float = 0.0):
    """Run ``command`` until its output says ``ready`` (then ``settle_s`` more), SIGTERM it; returns
    (seconds until it and every process it started had ended, the command lines of what it had
    started, the pids left, its output)."""
    log = tmp_path / "command.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        _wait_for_line(log, ready, process, timeout_s=600)
        time.sleep(settle_s)
        started = _still_running(_descendants(process.pid))
        commands = [" ".join(_cmdline(p)) for p in started]
        seconds, left = _terminate_and_wait(process, started, timeout_s=60)
    finally:
        if process.poll() is None:
            process.kill()
    return seconds, commands, left, log.read_text(errors="replace")


@pytest.mark.fault("SIGTERM ends everything")
def test_sigterm_mid_chain_ends_the_demo_its_servers_workers_and_flow_runs(tmp_path, fault_figures):
    seconds, started, left, log = _start_then_terminate(
        [CORRFLOW, "demo", "--across-facilities", "--data-root", str(tmp_path / "data"), "--projections", "720"],
        tmp_path, ready="the chain starts at the beamline", settle_s=5.0,  # the chain is running on the workers
    )
    assert len(started) >= 5, started  # two servers, three workers (and their children)
    assert not left, f"processes outlived the demo: {left}\n{log[-3000:]}"
    fault_figures["SIGTERM -> everything ended (s)"] = round(seconds, 1)
    fault_figures["processes ended"] = len(started)


@pytest.mark.fault("SIGTERM ends everything")
def test_sigterm_ends_the_simulated_facility_and_its_channel_access_repeater(tmp_path, fault_figures):
    seconds, started, left, _ = _start_then_terminate(
        [CORRFLOW, "sim", "up", "--prefix", "CFPROC:", "--log-dir", str(tmp_path)], tmp_path, ready="export EPICS_CA_ADDR_LIST"
    )
    assert any("repeater" in command for command in started), started
    assert not left, f"processes outlived `corrflow sim up`: {left}"
    fault_figures["SIGTERM -> IOCs and repeater ended (s)"] = round(seconds, 1)
    fault_figures["processes ended"] = len(started)
