"""The scheduler table: community alias -> diffusers scheduler class and config overrides.

A scheduler holds per-request state (``step()`` advances an index, multistep
solvers keep past outputs), so every request gets a fresh one, built with
``from_config`` from the model's own frozen scheduler config: the betas, the
timestep spacing and the prediction type always come from the model; an
alias only picks the solver.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest

__all__ = [
    "DEFAULT",
    "SCHEDULERS",
    "SchedulerChoice",
    "check_name",
    "known_names",
    "make_scheduler",
    "step_kwargs",
]

# The name (or absence of a name) that means "the model's own scheduler config".
DEFAULT = "default"


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler"),
    "lms": SchedulerChoice("LMSDiscreteScheduler"),
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerChoice("HeunDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
}


def known_names() -> str:
    return ", ".join([DEFAULT, *SCHEDULERS])


def check_name(name: str | None) -> None:
    """Raise :class:`InvalidRequest` unless ``name`` is in the table (or means the default)."""
    if name is not None and name != DEFAULT and name not in SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {name!r}; known schedulers: {known_names()}")


def make_scheduler(name: str | None, config: Mapping[str, Any]):
    """A fresh scheduler for one request: ``SCHEDULERS[name]``, or the model's own class.

    ``config`` is the model's ``scheduler_config.json``; ``name`` None or
    ``"default"`` builds its ``_class_name``.
    """
    import diffusers

    check_name(name)
    if name is None or name == DEFAULT:
        choice = SchedulerChoice(config["_class_name"])
    else:
        choice = SCHEDULERS[name]
    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(dict(config), **choice.overrides)


@functools.cache
def _step_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.step).parameters)


def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict[str, Any]:
    """Extra keyword arguments for ``scheduler.step``: ``eta`` and ``generator`` where it takes them.

    This is the one place that reads a signature, on purpose: diffusers'
    pipelines decide exactly this way (``prepare_extra_step_kwargs``), and
    the same generator that drew the initial latents must feed the ancestral
    schedulers' noise, or the images would not match diffusers'.
    """
    accepted = _step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
