"""The scheduler table: community alias -> diffusers scheduler class and config overrides.

A scheduler holds per-request state (``step()`` advances an index, multistep
solvers keep past outputs, DPM++ SDE its Brownian tree), so every request gets
a fresh one, built with ``from_config`` from the model's own frozen scheduler
config: the betas, the timestep spacing and the prediction type always come
from the model, whatever its family; an alias picks only the solver and, for
the k-diffusion style solvers, the sigma schedule (``_karras``,
``_exponential``, ``_beta``: the web UI's "Schedule type").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest

__all__ = [
    "DEFAULT",
    "SCHEDULERS",
    "SIGMA_SCHEDULES",
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


# Alias suffix -> the diffusers flag that spaces the sigmas that way. A solver
# that has these flags gets one alias per schedule, and its plain alias turns
# all of them off (the model's own timestep spacing), so an alias means the
# same schedule whatever the model's config says.
SIGMA_SCHEDULES: dict[str, str] = {
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}


def _with_sigma_schedules(
    alias: str, class_name: str, **overrides: Any
) -> Iterator[tuple[str, SchedulerChoice]]:
    """``alias`` with the model's sigmas, then ``alias_karras``, ``alias_exponential``, ``alias_beta``."""
    off = dict.fromkeys(SIGMA_SCHEDULES.values(), False)
    yield alias, SchedulerChoice(class_name, {**overrides, **off})
    for suffix, flag in SIGMA_SCHEDULES.items():
        yield f"{alias}_{suffix}", SchedulerChoice(class_name, {**overrides, **off, flag: True})


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler"),
    **dict(_with_sigma_schedules("lms", "LMSDiscreteScheduler")),
    **dict(_with_sigma_schedules("euler", "EulerDiscreteScheduler")),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    **dict(_with_sigma_schedules("heun", "HeunDiscreteScheduler")),
    **dict(_with_sigma_schedules("dpm2", "KDPM2DiscreteScheduler")),
    **dict(_with_sigma_schedules("dpm2_a", "KDPM2AncestralDiscreteScheduler")),
    **dict(
        _with_sigma_schedules(
            "dpmpp_2m", "DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2
        )
    ),
    **dict(
        _with_sigma_schedules(
            "dpmpp_2m_sde",
            "DPMSolverMultistepScheduler",
            algorithm_type="sde-dpmsolver++",
            solver_order=2,
        )
    ),
    # Needs torchsde; draws its noise from a Brownian tree seeded from the request.
    **dict(_with_sigma_schedules("dpmpp_sde", "DPMSolverSDEScheduler")),
    **dict(_with_sigma_schedules("unipc", "UniPCMultistepScheduler")),
    **dict(_with_sigma_schedules("deis", "DEISMultistepScheduler")),
    "ddpm": SchedulerChoice("DDPMScheduler"),
    # Meant for LCM- / TCD-distilled models; they run on any model, as in diffusers.
    "lcm": SchedulerChoice("LCMScheduler"),
    "tcd": SchedulerChoice("TCDScheduler"),
}


def known_names() -> str:
    return ", ".join([DEFAULT, *SCHEDULERS])


def check_name(name: str | None) -> None:
    """Raise :class:`InvalidRequest` unless ``name`` is in the table (or means the default)."""
    if name is not None and name != DEFAULT and name not in SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {name!r}; known schedulers: {known_names()}")


def make_scheduler(name: str | None, config: Mapping[str, Any], seed: int | None = None):
    """A fresh scheduler for one request: ``SCHEDULERS[name]``, or the model's own class.

    ``config`` is the model's ``scheduler_config.json``; ``name`` None or
    ``"default"`` builds its ``_class_name``. ``seed`` (the request's) seeds
    a scheduler that draws its own noise instead of taking the request's
    generator (``DPMSolverSDEScheduler``'s ``noise_sampler_seed``).
    """
    import diffusers

    check_name(name)
    if name is None or name == DEFAULT:
        choice = SchedulerChoice(config["_class_name"])
    else:
        choice = SCHEDULERS[name]
    cls = getattr(diffusers, choice.class_name)
    overrides = dict(choice.overrides)
    if seed is not None and "noise_sampler_seed" in _init_parameters(cls):
        overrides["noise_sampler_seed"] = noise_sampler_seed(seed)
    return cls.from_config(dict(config), **overrides)


def noise_sampler_seed(seed: int) -> int:
    """The request's int64 seed as the unsigned 64-bit number ``torch.Generator`` makes of it.

    torchsde's Brownian tree takes only non-negative entropy; a negative seed
    is read modulo 2**64, as ``torch.Generator.manual_seed`` reads it.
    """
    return seed % 2**64


@functools.cache
def _init_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


@functools.cache
def _step_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.step).parameters)


def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict[str, Any]:
    """Extra keyword arguments for ``scheduler.step``: ``eta`` and ``generator`` where it takes them.

    This is the one place that reads a ``step`` signature, on purpose:
    diffusers' pipelines decide exactly this way (``prepare_extra_step_kwargs``),
    and the same generator that drew the initial latents must feed the
    ancestral schedulers' noise, or the images would not match diffusers'.
    """
    accepted = _step_parameters(type(scheduler))
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
