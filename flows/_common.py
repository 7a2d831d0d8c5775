"""Small pieces every flow shares: settings resolution and flow-run names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corrflow.config.settings import Settings, active_settings


def flow_settings() -> Settings:
    """Settings for a flow run: those its runner activated, else validated from the environment and
    the YAML file of the process running it (a worker at another facility validates its own
    settings; the dashboard never sends them). In a process a worker started, it also starts the
    watch that ends the flow run should that worker die (:mod:`corrflow.operations.supervision`)."""
    from corrflow.operations.supervision import watch_worker

    watch_worker()  # a flow run started by a worker ends if that worker dies
    settings = active_settings()
    settings.ensure_directories()
    return settings


def sample_name_of(parameters: dict[str, Any]) -> str:
    """The sample a flow run is about: its ``sample`` parameter, or its ``request``'s sample."""
    request = parameters.get("request")
    sample = parameters.get("sample")
    if sample is None and request is not None:
        sample = getattr(request, "sample", None) or (request.get("sample") if isinstance(request, dict) else None)
        if sample is None:  # a request with the default sample
            from corrflow.flows.models import DEFAULT_SAMPLE

            sample = DEFAULT_SAMPLE
    if sample is None:
        return "unknown-sample"
    name = getattr(sample, "name", None) or (sample.get("name") if isinstance(sample, dict) else None)
    return str(name or "unknown-sample")


def run_name(stage: str) -> Callable[[], str]:
    """A flow-run name factory: ``<sample> · <stage>`` so the dashboard says what and which sample."""

    def _name() -> str:
        from prefect.runtime import flow_run

        return f"{sample_name_of(flow_run.parameters)} · {stage}"

    return _name
