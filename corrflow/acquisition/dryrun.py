"""Dry-run a plan on simulated devices: validate, estimate, walk the messages, run, summarise.

Whatever the instruments' configured mode, a dry-run uses the simulated instruments (that is what
makes it dry) and writes its detector files to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import inspect
import tempfile
import time
import typing
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from corrflow.config.settings import Settings


class DryRunError(ValueError):
    """The plan name or its parameters are wrong; nothing was moved or written."""


def _plan_specs():
    from corrflow.plans import PLAN_SPECS

    return PLAN_SPECS


def _parameter_docs(func: Any) -> dict[str, str]:
    """First sentence of each parameter's entry in a numpydoc ``Parameters`` section (names may be grouped)."""
    lines = inspect.cleandoc(func.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Parameters") + 2
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    text: list[str] = []

    def flush() -> None:
        sentence = " ".join(text).split(". ")[0].rstrip(".")
        for n in names:
            docs[n] = sentence

    for line in lines[start:]:
        if line and not line.startswith(" "):
            if set(line.strip()) == {"-"} or not line[0].isidentifier():
                break  # the next section's underline (or title) ends the parameters
            flush()
            names, text = [n.strip() for n in line.split(":")[0].split(",")], []
        elif line.strip():
            text.append(line.strip())
        elif text:
            flush()
            names, text = [], []
        if line.strip() in ("Returns", "Raises", "Yields", "Notes"):
            break
    flush()
    return docs


def describe_plans() -> dict[str, dict[str, Any]]:
    """Each plan's keyword parameters with their types and defaults (from the plan's signature) and
    what each means (the first sentence of its numpydoc entry)."""
    out: dict[str, dict[str, Any]] = {}
    for name, spec in _plan_specs().items():
        signature = inspect.signature(spec.plan)
        docs = _parameter_docs(spec.plan)
        params, descriptions = {}, {}
        for p in signature.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "md":
                continue
            annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
            default = "required" if p.default is inspect.Parameter.empty else repr(p.default)
            params[p.name] = f"{annotation} = {default}"
            if p.name in docs:
                descriptions[p.name] = docs[p.name]
        out[name] = {"instrument": spec.instrument, "parameters": params, "descriptions": descriptions}
    return out


_SAMPLE_OPTIONS = ("sample", "proposal", "user")


def parse_plan_parameters(plan_name: str, raw: dict[str, str]) -> dict[str, Any]:
    """The plan's keyword arguments from ``corrflow dry-run``'s ``name=value`` pairs.

    Values are JSON (``360``, ``null``, ``[1, 2]``) or plain text. A plan with a request model is parsed
    by that model (:mod:`corrflow.plans.requests`), exactly as the flows' forms and the plan itself
    check it; ``sample``, ``proposal`` and ``user`` give the :class:`~corrflow.plans.metadata.Sample`.

    Raises
    ------
    DryRunError
        An unknown plan or parameter, or a value the plan refuses; nothing was moved or written.
    """
    from corrflow.plans import PlanValidationError

    specs = _plan_specs()
    if plan_name not in specs:
        raise DryRunError(f"unknown plan {plan_name!r}; known plans: {sorted(specs)}")
    spec = specs[plan_name]
    if spec.request is None:
        return _coerce(plan_name, spec.plan, raw)
    values = {name: _literal(text) for name, text in raw.items() if name not in _SAMPLE_OPTIONS}
    unknown = sorted(set(values) - set(spec.request.model_fields))
    if unknown:
        raise DryRunError(f"{plan_name}: unknown parameter(s) {unknown}; known: {sorted(spec.request.model_fields)}")
    try:
        request = spec.request.build(**values)
    except PlanValidationError as exc:
        known = sorted(spec.request.model_fields)
        raise DryRunError(f"{exc}\n  (parameters of {plan_name}: {known})") from None
    return {**request.model_dump(), "sample": _sample_of(raw)}


def _sample_of(raw: dict[str, str]) -> dict[str, str]:
    return {
        "name": raw.get("sample", "dry-run-sample"),
        "proposal": raw.get("proposal", "dry-run"),
        "user": raw.get("user", "dry-run"),
    }


def _coerce(plan_name: str, plan: Any, raw: dict[str, str]) -> dict[str, Any]:
    # Plans without a request model yet: typed from the signature.
    hints = typing.get_type_hints(plan)
    signature = inspect.signature(plan)
    allowed = {p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"md"}
    unknown = sorted(set(raw) - allowed - {"proposal", "user"})
    if unknown:
        raise DryRunError(f"{plan_name}: unknown parameter(s) {unknown}; known: {sorted(allowed)}")
    values: dict[str, Any] = {}
    for name, text in raw.items():
        if name in ("sample", "proposal", "user"):
            continue
        try:
            values[name] = TypeAdapter(hints[name]).validate_python(text if hints[name] is str else _literal(text))
        except ValidationError as exc:
            raise DryRunError(f"{plan_name}: parameter {name}={text!r}: {exc.errors()[0]['msg']}") from None
    values["sample"] = _sample_of(raw)
    return values


def _literal(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def dry_run_plan(settings: Settings, plan_name: str, raw_params: dict[str, str]) -> dict[str, Any]:
    """Validate, estimate and run ``plan_name`` on simulated devices; return a summary."""
    from corrflow.devices.beamline import build_beamline
    from corrflow.devices.sem import build_microscope
    from corrflow.plans import PlanValidationError, summarize_messages
    from corrflow.acquisition.runengine import make_run_engine
    from corrflow.simulators.world import SimulatedWorld

    kwargs = parse_plan_parameters(plan_name, raw_params)
    spec = _plan_specs()[plan_name]
    # A dry run always uses simulated instruments, whatever the configured mode.
    sim_settings = settings.model_copy(
        update={"beamline": settings.beamline.model_copy(update={"mode": "sim"}),
                "microscope": settings.microscope.model_copy(update={"mode": "sim"})}
    )
    with tempfile.TemporaryDirectory(prefix="corrflow-dry-run-") as tmp:
        world = SimulatedWorld(sim_settings.simulation)
        build = build_beamline if spec.instrument == "beamline" else build_microscope
        instrument = build(sim_settings, world, data_dir=Path(tmp))
        try:
            started = time.perf_counter()
            estimate = spec.estimate(instrument, **kwargs)
            messages = summarize_messages(spec.plan(instrument, **kwargs))
            validation_s = time.perf_counter() - started
        except PlanValidationError as exc:
            raise DryRunError(str(exc)) from None
        documents: Counter[str] = Counter()
        stop: dict[str, Any] = {}

        def collect(name: str, doc: dict[str, Any]) -> None:
            documents[name] += 1
            if name == "stop":
                stop.update(doc)

        protections = (sim_settings.beamline if spec.instrument == "beamline" else sim_settings.microscope).protections
        engine = make_run_engine(collect, instrument=instrument, protections=protections)
        started = time.perf_counter()
        uids = engine(spec.plan(instrument, **kwargs))
        wall_s = time.perf_counter() - started
        files = sorted(p.name for p in Path(tmp).rglob("*") if p.is_file())
    return {
        "plan": plan_name,
        "parameters": {k: v for k, v in kwargs.items()},
        "validation_s": round(validation_s, 4),
        "estimate": {"duration_s": estimate.duration_s, "data_bytes": estimate.data_bytes, "n_frames": estimate.n_frames},
        "messages": messages,
        "run": {
            "uids": list(uids),
            "exit_status": stop.get("exit_status"),
            "documents": dict(documents),
            "wall_s": round(wall_s, 3),
            "files_written": files,
        },
    }
