"""The server's own account of a run: per-model inference statistics, as deltas.

Triton counts, per model, *inferences* (samples; a request of batch 2 counts
2) and *executions* (model runs; a dynamic batch of several requests counts
1), cumulative times per phase, and a histogram of executed batch sizes.
Two snapshots around a run give what that run did; for the UNet, samples per
execution above the request's own batch (2 with classifier-free guidance)
show that the dynamic batcher merged steps of different requests.

The pipeline's own counters come from the metrics port (Prometheus text):
:func:`denoise_snapshot` reads ``sd_denoise_steps_total`` and
``sd_denoise_seconds_total``, whose deltas give the time per denoising step as
the pipeline's loop measures it, free of the per-request costs.
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, field

PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class ModelStats:
    """Cumulative counters of one model (or the difference of two snapshots)."""

    inference_count: int = 0
    execution_count: int = 0
    # phase -> (count, total ns)
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)
    # executed batch size -> number of executions
    batches: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, stats: dict) -> ModelStats:
        """One entry of ``get_inference_statistics(as_json=True)["model_stats"]`` (int64s come as strings)."""
        phases = {
            name: (int(v.get("count", 0)), int(v.get("ns", 0)))
            for name, v in stats.get("inference_stats", {}).items()
            if name in PHASES
        }
        batches = {
            int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
            for b in stats.get("batch_stats", [])
        }
        return cls(
            int(stats.get("inference_count", 0)),
            int(stats.get("execution_count", 0)),
            phases,
            batches,
        )

    def _combine(self, other: ModelStats, sign: int) -> ModelStats:
        zero = (0, 0)
        names = dict.fromkeys([*self.phases, *other.phases])
        phases = {
            k: (
                self.phases.get(k, zero)[0] + sign * other.phases.get(k, zero)[0],
                self.phases.get(k, zero)[1] + sign * other.phases.get(k, zero)[1],
            )
            for k in names
        }
        sizes = sorted({*self.batches, *other.batches})
        batches = {k: self.batches.get(k, 0) + sign * other.batches.get(k, 0) for k in sizes}
        return ModelStats(
            self.inference_count + sign * other.inference_count,
            self.execution_count + sign * other.execution_count,
            phases,
            {k: n for k, n in batches.items() if n},
        )

    def __add__(self, other: ModelStats) -> ModelStats:
        return self._combine(other, 1)

    def __sub__(self, other: ModelStats) -> ModelStats:
        return self._combine(other, -1)

    @property
    def samples_per_execution(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    def ms_per_execution(self, phase: str = "compute_infer") -> float:
        """Mean time of one execution in a compute phase; for ``queue``, per request."""
        count, ns = self.phases.get(phase, (0, 0))
        per = count if phase in ("queue", "success") else self.execution_count
        return ns / per / 1e6 if per else 0.0

    @property
    def request_count(self) -> int:
        """Requests (for the UNet: step calls) that succeeded."""
        return self.phases.get("success", (0, 0))[0]

    def to_dict(self) -> dict:
        calls = self.request_count
        return {
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "request_count": calls,
            "samples_per_execution": round(self.samples_per_execution, 3),
            "requests_per_execution": round(calls / self.execution_count, 3)
            if self.execution_count
            else 0.0,
            "compute_infer_ms_per_execution": round(self.ms_per_execution("compute_infer"), 3),
            "queue_ms_per_request": round(self.ms_per_execution("queue"), 3),
            "batch_sizes": {str(k): v for k, v in self.batches.items()},
        }


def unet_cells(unet: dict) -> str:
    """A Markdown row's UNet cells: samples/exec, exec/image, ms/exec and batch sizes
    ("-" where the source does not tell: the UNet in the pipeline's process counts its
    runs and samples, not their times or sizes)."""
    sizes = " ".join(f"{k}×{n}" for k, n in unet["batch_sizes"].items()) or "-"
    ms = unet["compute_infer_ms_per_execution"]
    return (
        f"| {unet['samples_per_execution']} | {unet['executions_per_image']} "
        f"| {'-' if ms is None else ms} | {sizes} |"
    )


def snapshot(client) -> dict[str, ModelStats]:
    """All models' statistics now; ``client`` is a ``tritonclient.grpc.InferenceServerClient``."""
    raw = client.get_inference_statistics(as_json=True)
    return {s["name"]: ModelStats.from_json(s) for s in raw.get("model_stats", [])}


def settled(
    client, before: dict[str, ModelStats], model: str, requests: int, timeout_s: float = 10.0
) -> dict[str, ModelStats]:
    """A snapshot that counts all ``requests`` sent to ``model`` since ``before``.

    The Python backend reports a request's statistics after its response
    is sent, so a snapshot taken as soon as the last reply arrives can miss
    the last requests' times: poll until their count is in (or ``timeout_s``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        now = snapshot(client)
        done = now.get(model, ModelStats()).phases.get("success", (0, 0))[0]
        done -= before.get(model, ModelStats()).phases.get("success", (0, 0))[0]
        if done >= requests or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def delta(after: dict[str, ModelStats], before: dict[str, ModelStats]) -> dict[str, ModelStats]:
    return {name: stats - before.get(name, ModelStats()) for name, stats in after.items()}


def total(parts: dict[str, ModelStats], more: dict[str, ModelStats]) -> dict[str, ModelStats]:
    """Per-model sums of two sets of statistics (e.g. deltas of two rounds)."""
    return {
        name: parts.get(name, ModelStats()) + more.get(name, ModelStats())
        for name in {*parts, *more}
    }


def time_per_image(
    per_model: dict[str, ModelStats], images: int, pipeline: str = "stable_diffusion"
) -> dict[str, float]:
    """Where a served image's server time went, in ms per image.

    ``pipeline``: the pipeline model's compute time (its whole ``execute``);
    ``pipeline_queue``: waiting for a free pipeline instance; each component:
    its requests' total time (queue + compute, Triton's ``success`` phase);
    ``pipeline_rest``: pipeline time outside the component calls (the loop's
    own work, tokenizer, scheduler, BLS transfers).
    """
    if not images or pipeline not in per_model:
        return {}

    def ms(stats: ModelStats, phase: str) -> float:
        return stats.phases.get(phase, (0, 0))[1] / images / 1e6

    out = {
        "pipeline": ms(per_model[pipeline], "compute_infer"),
        "pipeline_queue": ms(per_model[pipeline], "queue"),
    }
    for name, stats in sorted(per_model.items()):
        if name != pipeline and stats.execution_count:
            out[name] = ms(stats, "success")
    out["pipeline_rest"] = out["pipeline"] - sum(
        v for k, v in out.items() if k not in ("pipeline", "pipeline_queue")
    )
    return {k: round(v, 2) for k, v in out.items()}


# ------------------------------------------------------------ the pipeline's metrics
def scrape(metrics_url: str) -> str:
    """The server's metrics page (Prometheus text format)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def denoise_snapshot(metrics_url: str, model: str) -> tuple[float, float]:
    """(steps, seconds) the pipeline model ``model`` has denoised so far (all its versions)."""
    text = scrape(metrics_url)
    return (
        metric(text, "sd_denoise_steps_total", model=model),
        metric(text, "sd_denoise_seconds_total", model=model),
    )


def ms_per_step(after: tuple[float, float], before: tuple[float, float]) -> float | None:
    """Milliseconds per denoising step between two :func:`denoise_snapshot`s (None: no step)."""
    steps = after[0] - before[0]
    return None if steps <= 0 else round((after[1] - before[1]) / steps * 1e3, 4)


UNET_IN_PIPELINE = ("sd_unet_executions_total", "sd_unet_requests_total", "sd_unet_samples_total")


def unet_snapshot(metrics_url: str, model: str) -> tuple[float, float, float]:
    """(runs, step calls, samples) of the UNet in pipeline ``model``'s process so far
    (its ``sd_unet_*`` metrics, all versions; zeros where it calls the UNet by BLS)."""
    text = scrape(metrics_url)
    runs, calls, samples = (metric(text, name, model=model) for name in UNET_IN_PIPELINE)
    return runs, calls, samples


def in_pipeline_unet(after: tuple[float, ...], before: tuple[float, ...]) -> dict:
    """The in-process UNet's runs between two :func:`unet_snapshot`s, keyed as
    :meth:`ModelStats.to_dict` (no times: the metrics count runs, calls and samples)."""
    runs, calls, samples = (int(round(b - a)) for a, b in zip(before, after, strict=True))
    return {
        "inference_count": samples,
        "execution_count": runs,
        "request_count": calls,
        "samples_per_execution": round(samples / runs, 3) if runs else 0.0,
        "requests_per_execution": round(calls / runs, 3) if runs else 0.0,
        "compute_infer_ms_per_execution": None,
        "queue_ms_per_request": None,
        "batch_sizes": {},
        "source": "sd_unet_* metrics",
    }
