"""Cancellation: SIGTERM (what a Prefect worker sends to a cancelled run; Prefect's handler raises
in the main thread) aborts the RunEngine within 5 s, with the motors stopped and the run closed
with exit_status 'abort', before the termination goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


CHILD = r'''
import json, signal, sys, time
from bluesky import plan_stubs as bps, preprocessors as bpp
from corrflow.acquisition.cancellation import register_engine, run_abortable
from corrflow.devices.beamline import build_beamline
from corrflow.acquisition.runengine import make_run_engine
from corrflow.config.settings import load_settings
from corrflow.simulators.world import SimulatedWorld

out = open(sys.argv[1], "a", buffering=1)
def emit(**kw):
    out.write(json.dumps(kw) + "\n")

# time_scale 0.1: the 300 deg move takes 33 s of wall time (90 deg per simulated second).
settings = load_settings(data_root=sys.argv[2], simulation={"time_scale": 0.1})
world = SimulatedWorld(settings.simulation)
beamline = build_beamline(settings, world, data_dir=sys.argv[2])
rotation = beamline.stage.rotation
engine = register_engine(make_run_engine(lambda name, doc: emit(doc=name, exit_status=doc.get("exit_status"), t=time.time())))

@bpp.run_decorator(md={"purpose": "cancellation test"})
def long_move():
    yield from bps.mv(rotation, 300.0)

class Terminated(BaseException):
    """Stands for Prefect's TerminationSignal, raised by its SIGTERM handler in the main thread."""


def supervisor_handler(signum, frame):
    raise Terminated()


signal.signal(signal.SIGTERM, supervisor_handler)
emit(event="started", t=time.time())
try:
    run_abortable(lambda: engine(long_move()), reason="flow run cancelled")
except Terminated:
    emit(event="terminated", t=time.time())
first = float(rotation.position)
time.sleep(0.5)
emit(event="motor", position_deg=first, later_deg=float(rotation.position), moving=bool(rotation.moving), t=time.time())
sys.exit(143)
'''


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_aborts_the_run_engine_within_5_s_with_motors_stopped(tmp_path):
    log = tmp_path / "child.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRFLOW_")}
    child = subprocess.Popen([sys.executable, str(script), str(log), str(tmp_path / "data")], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r.get("doc") == "start" for r in (_records(log) if log.exists() else [])):
            time.sleep(0.1)
        assert log.exists(), "the child never started"
        time.sleep(1.0)  # the rotation is moving now
        sent = time.time()
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
    records = _records(log)
    stops = [r for r in records if r.get("doc") == "stop"]
    assert len(stops) == 1, records
    assert stops[0]["exit_status"] == "abort"
    assert stops[0]["t"] - sent < 5.0, f"stop document {stops[0]['t'] - sent:.2f} s after SIGTERM"
    motor = next(r for r in records if r.get("event") == "motor")
    assert not motor["moving"]
    # Still moving it would cover 4.5 deg in those 0.5 s (9 deg/s); the motion thread may publish
    # one last readback (5 ms of motion) after stop().
    assert abs(motor["later_deg"] - motor["position_deg"]) < 0.1, "the rotation kept moving"
    assert 0.0 < motor["position_deg"] < 300.0, "the move was neither started nor interrupted"
    # The supervisor's termination went on only after the run was closed.
    terminated = next(r for r in records if r.get("event") == "terminated")
    assert terminated["t"] >= stops[0]["t"]
    assert child.returncode == 143
