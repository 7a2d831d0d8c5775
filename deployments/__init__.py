"""Deployments per site: one YAML file per site (``beamline.yaml``, ``compute.yaml``, ``microscope.yaml``).

The files hold only data (which flows a site runs, their default parameters, tags and schedules);
:func:`load_site` turns a file into typed :class:`SiteSpec` objects and :mod:`corrflow.operations.deploy`
applies them to a Prefect server. Entry points are module paths (``corrflow.flows.pipeline:correlative_chain``),
never file paths, so a worker started in any working directory finds them in the installed package.

Names the rest of corrflow relies on: a deployment is addressed as ``<flow name>/<deployment name>``
and every site names its deployments after itself (``correlative-chain/beamline``,
``flight-check/compute``); :func:`deployment_path` builds these names.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from corrflow.config.settings import SITES, Site

__all__ = ["DeploymentSpec", "ScheduleSpec", "SiteSpec", "all_sites", "deployment_path", "load_site"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleSpec(_Spec):
    """A cron or interval schedule (exactly one of them)."""

    cron: str | None = Field(None, description="Cron expression, e.g. '*/30 * * * *'")
    interval_s: float | None = Field(None, gt=0, description="Fixed interval (s)")
    timezone: str = Field("UTC", description="Time zone of the cron expression")
    active: bool = Field(True, description="Inactive schedules are declared but create no runs")

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("give exactly one of cron or interval_s")
        return self


class DeploymentSpec(_Spec):
    """One deployment of a flow on its site's work pool; it is named after the site."""

    entrypoint: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="module.path:flow_function (never a file path)"
    )
    description: str = Field(min_length=1)
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = Field(default_factory=dict, description="Default parameters of its runs")
    schedules: tuple[ScheduleSpec, ...] = ()


class SiteSpec(_Spec):
    """A site: its work pool, its instruments (one concurrency limit each) and its deployments."""

    site: Site
    pool_description: str
    instruments: tuple[Literal["beamline", "microscope"], ...] = Field(
        (), description="Settings sections of the instruments at this site (their `name` names the limit)"
    )
    deployments: tuple[DeploymentSpec, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> SiteSpec:
        entrypoints = [d.entrypoint for d in self.deployments]
        if len(entrypoints) != len(set(entrypoints)):
            raise ValueError(f"site {self.site}: a flow is deployed twice: {entrypoints}")
        return self


def load_site(site: Site) -> SiteSpec:
    """Read and validate ``deployments/<site>.yaml`` (shipped as package data)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    text = resources.files(__package__).joinpath(f"{site}.yaml").read_text()
    spec = SiteSpec.model_validate(yaml.safe_load(text))
    if spec.site != site:
        raise ValueError(f"{site}.yaml declares site {spec.site!r}")
    return spec


def all_sites() -> tuple[SiteSpec, ...]:
    return tuple(load_site(site) for site in SITES)


def deployment_path(flow_name: str, site: Site) -> str:
    """The ``flow/deployment`` name of ``flow_name``'s deployment at ``site`` (deployments are named after sites)."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    return f"{flow_name}/{site}"
