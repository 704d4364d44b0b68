"""perf_analyzer, set up by the project: extract, input data, runs.

Triton's own load generator ships inside the ``tritonclient==2.51.0`` wheel,
the release that matches the pip-installed server (later wheels dropped the
binary or need a newer glibc). Installing that wheel into the project's
environment would downgrade protobuf, so :func:`setup` only *extracts* the
binary into ``build/perf_analyzer/bin/`` and links the two libraries it needs
(``libb64.so.0d``, ``libcudart.so.12``), which the nvidia-pytriton wheel
already carries under hashed names, into ``build/perf_analyzer/lib/``.

Command line::

    python -m sd_triton.benchmarks.perf_analyzer setup
    python -m sd_triton.benchmarks.perf_analyzer inputs build/model_repository
    python -m sd_triton.benchmarks.perf_analyzer run build/model_repository \\
        [--url 127.0.0.1:8001] [--model stable_diffusion|unet] [--concurrency 1,2,4,8] \\
        [--model-prefix xl_] [--chunks 2]

``run`` starts a server on the repository unless ``--url`` names a running
one, writes the input data, runs perf_analyzer over gRPC once per concurrency
level and saves one CSV (perf_analyzer's own columns plus ``Concurrency``
first) and its console output under ``build/perf_analyzer/results/``.
Model names, the components the pipeline calls and the UNet's inputs (SDXL's
``text_embeds`` and ``time_ids`` included) come from the repository: the
pipeline's ``pipeline.json`` and the UNet's ``config.pbtxt``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TRITONCLIENT_VERSION = "2.51.0"
DEFAULT_DIR = Path("build/perf_analyzer")
DEFAULT_CONCURRENCY = (1, 2, 4, 8)
# Library name the binary asks for -> glob of the hashed copy in nvidia_pytriton.libs.
LIBRARIES = {
    "libb64.so.0d": "libb64-*.so.0d",
    "libcudart.so.12": "libcudart-*.so.12*",
}

PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen, studio lighting, 35mm",
    "an isometric pixel-art city at night",
)


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not be set up or did not run."""


@dataclass(frozen=True)
class PerfAnalyzer:
    """The extracted binary and the private folder that holds its libraries."""

    binary: Path
    lib_dir: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def check(self) -> None:
        """Run ``--version``: fails if the binary or one of its libraries is missing.

        (Its output is not used: the binary exits without flushing stdout at times.)
        """
        try:
            out = subprocess.run(
                [str(self.binary), "--version"], env=self.env(), capture_output=True, text=True
            )
        except OSError as e:
            raise PerfAnalyzerError(f"cannot run {self.binary}: {e}") from e
        if out.returncode != 0:
            raise PerfAnalyzerError(f"{self.binary} --version failed:\n{out.stderr or out.stdout}")


# ---------------------------------------------------------------- set-up
def _pytriton_libs() -> Path:
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise PerfAnalyzerError(f"no nvidia_pytriton.libs folder beside pytriton ({libs})")
    return libs


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = f"tritonclient-{TRITONCLIENT_VERSION}-py3-none-manylinux1_x86_64.whl"
    if (dest / name).exists():
        return dest / name
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "--platform", "manylinux1_x86_64", "-d", str(dest)]
    cmd.append(f"tritonclient=={TRITONCLIENT_VERSION}")
    log.info("downloading tritonclient %s (perf_analyzer only)", TRITONCLIENT_VERSION)
    subprocess.run(cmd, check=True)
    if not (dest / name).exists():
        raise PerfAnalyzerError(f"pip download did not produce {dest / name}")
    return dest / name


def setup(
    dest: str | os.PathLike = DEFAULT_DIR, *, wheel: str | os.PathLike | None = None
) -> PerfAnalyzer:
    """Extract perf_analyzer from the tritonclient wheel and link its libraries (idempotent).

    ``wheel`` is a local ``tritonclient-2.51.0`` wheel; without it the wheel is
    fetched with ``pip download --no-deps`` (kept in ``dest/wheel/``).
    """
    dest = Path(dest)
    pa = PerfAnalyzer(binary=dest / "bin" / "perf_analyzer", lib_dir=dest / "lib")
    stamp = dest / "VERSION"
    if not (
        pa.binary.exists() and stamp.exists() and stamp.read_text().strip() == TRITONCLIENT_VERSION
    ):
        whl = Path(wheel) if wheel else _download_wheel(dest / "wheel")
        member = f"tritonclient-{TRITONCLIENT_VERSION}.data/data/bin/perf_analyzer"
        with zipfile.ZipFile(whl) as z:
            if member not in z.namelist():
                raise PerfAnalyzerError(f"{whl} has no {member}")
            pa.binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = pa.binary.with_suffix(".part")
            tmp.write_bytes(z.read(member))
            tmp.chmod(0o755)
            tmp.replace(pa.binary)
    pa.lib_dir.mkdir(parents=True, exist_ok=True)
    libs = _pytriton_libs()
    for plain, pattern in LIBRARIES.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise PerfAnalyzerError(f"no {pattern} in {libs}")
        link = pa.lib_dir / plain
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    pa.check()
    stamp.write_text(TRITONCLIENT_VERSION + "\n")
    return pa


# ------------------------------------------------------------ input data
def _b64(array: np.ndarray) -> dict:
    return {
        "b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
        "shape": list(array.shape),
    }


def pipeline_constants(repository: str | os.PathLike, model: str = "stable_diffusion") -> dict:
    """The ``pipeline.json`` of pipeline model ``model`` (sizes, text width, dtype...)."""
    path = Path(repository) / model / "1" / "assets" / "pipeline.json"
    return json.loads(path.read_text())


def model_names(constants: dict) -> dict[str, str]:
    """The Triton model of each role (``stable_diffusion``, ``unet``) and of each component
    the pipeline calls, as the pipeline's ``pipeline.json`` names them (``--model-prefix``)."""
    prefix = constants.get("model_prefix") or ""
    return {"stable_diffusion": f"{prefix}stable_diffusion", **constants["component_models"]}


def composing_models(constants: dict) -> tuple[str, ...]:
    """``--bls-composing-models`` of the pipeline: the component models a text-to-image
    request calls (all but the VAE encoder)."""
    names = model_names(constants)
    skip = ("stable_diffusion", "vae_encoder")
    return tuple(model for role, model in names.items() if role not in skip)


def stable_diffusion_inputs(
    *,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float = 7.5,
    seeds: Sequence[int] = (0, 1, 2, 3),
    prompts: Sequence[str] = PROMPTS,
) -> dict:
    """perf_analyzer ``--input-data`` for ``stable_diffusion``: one entry per (prompt, seed)."""
    data = [
        {
            "prompt": [prompt],
            "height": [height],
            "width": [width],
            "num_inference_steps": [steps],
            "guidance_scale": [guidance_scale],
            "seed": [seed],
        }
        for prompt, seed in ((prompts[i % len(prompts)], seed) for i, seed in enumerate(seeds))
    ]
    return {"data": data}


def unet_shapes(
    config, constants: dict, *, height: int, width: int, chunks: int = 1
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every input the UNet's ``config.pbtxt`` (a ``ModelConfig``) declares, with its dtype and
    the shape of one sample: its fixed dims as declared, its dynamic ones (``-1``) named by the
    tensor contract (``sd_pipeline.spec.unet_spec``) and sized for ``height`` x ``width`` pixels
    and ``chunks`` prompt chunks of ``tokenizer_max_length`` tokens. SDXL's ``text_embeds`` and
    ``time_ids`` and LCM's ``timestep_cond`` come with the config that declares them."""
    from tritonclient.grpc import model_config_pb2 as pb

    from sd_pipeline import spec

    factor = constants["vae_scale_factor"]
    sizes = {
        "latent_height": height // factor,
        "latent_width": width // factor,
        "text_sequence": constants["tokenizer_max_length"] * chunks,
    }
    contract = {t.name: t for t in spec.unet_spec(text_time=True, timestep_cond=True).inputs}
    dtypes = {triton: name for name, triton in spec.TRITON_DTYPES.items()}
    shapes = {}
    for tensor in config.input:
        dtype = np.dtype(dtypes[pb.DataType.Name(tensor.data_type)])
        symbols = [None] * len(tensor.dims)
        if -1 in tensor.dims:
            if tensor.name not in contract:
                raise PerfAnalyzerError(
                    f"{config.name}'s input {tensor.name} has dynamic dims and is not in the "
                    "UNet's contract: cannot size it"
                )
            symbols = list(contract[tensor.name].dims[1:])
        shape = tuple(sizes[s] if d == -1 else d for d, s in zip(tensor.dims, symbols, strict=True))
        shapes[tensor.name] = (dtype, shape)
    return shapes


def unet_inputs(
    config,
    constants: dict,
    *,
    height: int,
    width: int,
    chunks: int = 1,
    entries: int = 2,
    seed: int = 0,
) -> dict:
    """perf_analyzer ``--input-data`` for the UNet alone, one sample per entry (``-b`` sets the
    batch): every input of its config (:func:`unet_shapes`), standard normal values, and a
    timestep per entry."""
    shapes = unet_shapes(config, constants, height=height, width=width, chunks=chunks)
    rng = np.random.default_rng(seed)
    data = []
    for i in range(entries):
        entry = {}
        for name, (dtype, shape) in shapes.items():
            values = np.full(shape, 999.0 - 50 * i) if name == "timestep" else None
            values = rng.standard_normal(shape) if values is None else values
            entry[name] = _b64(values.astype(dtype))
        data.append(entry)
    return {"data": data}


def write_inputs(
    repository: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_prefix: str = "",
    height: int | None = None,
    width: int | None = None,
    steps: int = 4,
    guidance_scale: float = 7.5,
    chunks: int = 1,
) -> dict[str, Path]:
    """Write ``stable_diffusion.json`` and ``unet.json`` for pipeline
    ``<model_prefix>stable_diffusion`` of the repository and its UNet; native size by default."""
    from sd_triton.export.triton_config import read_config

    constants = pipeline_constants(repository, f"{model_prefix}stable_diffusion")
    height = height or constants["native_height"]
    width = width or constants["native_width"]
    unet = read_config(Path(repository) / model_names(constants)["unet"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "stable_diffusion": (
            stable_diffusion_inputs(
                height=height, width=width, steps=steps, guidance_scale=guidance_scale
            )
        ),
        "unet": unet_inputs(unet, constants, height=height, width=width, chunks=chunks),
    }
    paths = {}
    for model, payload in files.items():
        paths[model] = out / f"{model}.json"
        paths[model].write_text(json.dumps(payload, indent=1) + "\n")
    return paths


# ------------------------------------------------------------------- run
def command(
    pa: PerfAnalyzer,
    *,
    model: str,
    url: str,
    input_data: str | os.PathLike,
    concurrency: int,
    csv_path: str | os.PathLike,
    request_count: int | None = None,
    batch_size: int = 1,
    composing_models: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The perf_analyzer command line for one concurrency level over gRPC."""
    cmd = [str(pa.binary), "-m", model, "-i", "grpc", "-u", url]
    cmd += ["--input-data", str(input_data), "-b", str(batch_size)]
    cmd += ["--concurrency-range", str(concurrency), "-f", str(csv_path)]
    cmd += ["--percentile", "95"]
    if request_count:
        # Exactly this many requests, no stability search: fits slow models.
        cmd += ["--request-count", str(request_count)]
    else:
        # perf_analyzer's stability search over time windows; a 2-core machine
        # shared with other work needs more slack than the default 10 %.
        cmd += ["--measurement-interval", "2000", "--stability-percentage", "25"]
    if composing_models:
        cmd += ["--bls-composing-models", ",".join(composing_models)]
    return cmd + list(extra)


def run(
    pa: PerfAnalyzer,
    *,
    model: str,
    url: str,
    input_data: str | os.PathLike,
    out_csv: str | os.PathLike,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    requests_per_worker: int | None = 2,
    batch_size: int = 1,
    composing_models: Sequence[str] = (),
    extra: Sequence[str] = (),
    timeout_s: float | None = None,
) -> list[dict[str, str]]:
    """Run perf_analyzer at each concurrency; save one CSV (``Concurrency`` first) and the console log.

    ``requests_per_worker`` sends ``c * requests_per_worker`` requests per
    level with no stability search (Stable Diffusion requests take seconds);
    ``None`` lets perf_analyzer search for stable windows as it usually does.
    """
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    logs = []
    for c in concurrency:
        part = out_csv.with_suffix(f".c{c}.csv")
        cmd = command(
            pa,
            model=model,
            url=url,
            input_data=input_data,
            concurrency=c,
            csv_path=part,
            request_count=c * requests_per_worker if requests_per_worker else None,
            batch_size=batch_size,
            composing_models=composing_models,
            extra=extra,
        )
        log.info("%s", " ".join(cmd))
        proc = subprocess.run(cmd, env=pa.env(), capture_output=True, text=True, timeout=timeout_s)
        logs.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0 or not part.exists():
            out_csv.with_suffix(".log").write_text("\n".join(logs))
            raise PerfAnalyzerError(
                f"perf_analyzer failed at concurrency {c}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        with open(part, newline="") as f:
            for row in csv.DictReader(io.StringIO(f.read())):
                rows.append(
                    {"Concurrency": str(c), **{k: v for k, v in row.items() if k != "Concurrency"}}
                )
        part.unlink()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    out_csv.with_suffix(".log").write_text("\n".join(logs))
    return rows


# ------------------------------------------------------------------- CLI
def _concurrency(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_triton.benchmarks.perf_analyzer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="where the binary, inputs and results go"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup", help="extract perf_analyzer and link its libraries")
    p_setup.add_argument("--wheel", help="a local tritonclient-2.51.0 wheel (else pip download)")
    for name in ("inputs", "run"):
        p = sub.add_parser(
            name, help="write input-data JSON" if name == "inputs" else "run perf_analyzer"
        )
        p.add_argument("repository", type=Path, help="exported model repository")
        p.add_argument(
            "--size", type=int, help="height = width in px (default: the model's native size)"
        )
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--guidance-scale", type=float, default=7.5)
        p.add_argument(
            "--model-prefix",
            default="",
            help="the pipeline <prefix>stable_diffusion of a repository of several (e.g. xl_)",
        )
        p.add_argument(
            "--chunks", type=int, default=1, help="unet: prompt chunks of 77 tokens (default 1)"
        )
    p_run = sub.choices["run"]
    p_run.add_argument("--url", help="gRPC address of a running server (default: start one)")
    p_run.add_argument("--model", choices=("stable_diffusion", "unet"), default="stable_diffusion")
    p_run.add_argument("--concurrency", type=_concurrency, default=DEFAULT_CONCURRENCY)
    p_run.add_argument(
        "--requests-per-worker",
        type=int,
        help="requests per level = c x this (default: 2 for stable_diffusion, 25 for unet); "
        "0: perf_analyzer's own stability search",
    )
    p_run.add_argument(
        "--batch-size", type=int, help="unet: samples per request (default 2, as with guidance)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "setup":
        pa = setup(args.dir, wheel=args.wheel)
        print(f"perf_analyzer {TRITONCLIENT_VERSION}: {pa.binary} (LD_LIBRARY_PATH={pa.lib_dir})")
        return 0
    size = {"height": args.size, "width": args.size}
    inputs = write_inputs(
        args.repository,
        args.dir / "inputs",
        model_prefix=args.model_prefix,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        chunks=args.chunks,
        **size,
    )
    if args.command == "inputs":
        for path in inputs.values():
            print(path)
        return 0

    pa = setup(args.dir)
    unet = args.model == "unet"
    constants = pipeline_constants(args.repository, f"{args.model_prefix}stable_diffusion")
    kwargs = {
        "model": model_names(constants)[args.model],
        "input_data": inputs[args.model],
        "out_csv": args.dir / "results" / f"{args.model}.csv",
        "concurrency": args.concurrency,
        "requests_per_worker": (
            (25 if unet else 2)
            if args.requests_per_worker is None
            else args.requests_per_worker or None
        ),
        "batch_size": (args.batch_size or 2) if unet else 1,
        "composing_models": () if unet else composing_models(constants),
    }
    if args.url:
        rows = run(pa, url=args.url, **kwargs)
    else:
        from sd_triton.server import TritonServer

        server = TritonServer(args.repository)
        server.start(timeout_s=900)  # full-size models load for minutes on a small machine
        try:
            rows = run(pa, url=server.grpc_url, **kwargs)
        finally:
            server.stop()
    for row in rows:
        print(
            f"concurrency {row['Concurrency']:>2}: {float(row['Inferences/Second']):8.3f} infer/s, "
            f"p50 {int(row['p50 latency']) / 1e3:9.1f} ms, p95 {int(row['p95 latency']) / 1e3:9.1f} ms"
        )
    print(f"CSV: {kwargs['out_csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
