"""``sd-triton-export``: a diffusers Stable Diffusion folder -> a Triton model repository.

Exit codes: 0 done; 2 a problem with the input or output folder (one line on
stderr, no traceback) or with the arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import adapters, single_file
from .checkpoint import ExportError
from .controlnet import controlnet_sources
from .options import (
    HOSTS,
    PRECISIONS,
    PRESETS,
    Contents,
    ExportOptions,
    Hosting,
    Naming,
    Precision,
)
from .repository import export_repository

PROG = "sd-triton-export"


def _parameter(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a diffusers-format Stable Diffusion folder to a Triton model repository.",
    )
    p.add_argument(
        "src",
        type=Path,
        help="diffusers folder (with model_index.json), or a single-file checkpoint "
        "(.safetensors, .ckpt: SD 1.x, 2.x, SDXL base or refiner, in the original layout)",
    )
    p.add_argument("out", type=Path, help="model repository folder to write")
    p.add_argument(
        "--host",
        choices=HOSTS,
        default="python",
        help="python: a Python-backend model runs each ONNX file with onnxruntime (any Triton, "
        "also the pip-installed one; default); onnxruntime: Triton's onnxruntime backend "
        "(NVIDIA's container); torch: a Python-backend model runs the diffusers module with "
        "torch (fp16 on CUDA, fp32 on CPU; no ONNX step)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp32; fp16 (float16 weights and tensors, the VAE too; the UNet "
        "timestep stays fp32); fp16-vae-fp32 (fp16, but the VAE encoder and decoder stay "
        "fp32); fp16-vae-auto (fp16; the VAE stays fp32 when the VAE's config says "
        "force_upcast: true, as the SD 1.x and SDXL VAEs do since they overflow in fp16, "
        "and goes fp16 when it says false). Default: fp16-vae-auto with --tensorrt, else fp32",
    )
    p.add_argument("--fp16", action="store_true", help="same as --precision fp16-vae-auto")
    p.add_argument(
        "--fp16-vae-decoder",
        action="store_true",
        help="with --fp16: --precision fp16 (the VAE float16 whatever its config says)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--dynamo", action="store_true", help="use torch.onnx's dynamo exporter (opset >= 18)"
    )
    p.add_argument("--unet-max-batch-size", type=int, default=16, metavar="N")
    p.add_argument(
        "--max-batch-size", type=int, default=8, metavar="N", help="other components' (default 8)"
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        metavar="US",
        help="UNet dynamic batching delay (default 0: calls queued while the UNet runs "
        "are merged anyway)",
    )
    p.add_argument("--preferred-batch-size", type=int, action="append", default=[], metavar="N")
    p.add_argument("--intra-op-threads", type=int, default=None, metavar="N")
    p.add_argument(
        "--no-safety-checker", action="store_true", help="export without the safety checker"
    )
    p.add_argument(
        "--safety-checker",
        type=Path,
        default=None,
        metavar="DIR",
        help="attach the safety checker and feature extractor of the diffusers checkpoint DIR "
        "(any family; SDXL ships none)",
    )
    p.add_argument(
        "--refiner",
        type=Path,
        default=None,
        metavar="DIR",
        help="with an SDXL base: export the SDXL refiner DIR (or single file) beside it "
        "(models refiner_*), "
        "so requests can hand the base's latents to it (refiner_switch_at)",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="record a distilled model's recommended request defaults: turbo (SDXL-/SD-Turbo: "
        "1 step, guidance 0, euler_a), lcm (LCM: 4 steps, guidance 8, lcm); "
        "--parameter overrides them",
    )
    p.add_argument(
        "--watermark",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="invisible watermark on the images (default: as diffusers, SDXL only)",
    )
    p.add_argument(
        "--pipeline-instances",
        type=int,
        default=4,
        metavar="N",
        help="instances (processes) of the stable_diffusion model (default 4; 1 with "
        "--unet-in-pipeline)",
    )
    p.add_argument(
        "--unet-in-pipeline",
        action="store_true",
        help="run the UNet's host (--host python or torch) inside the pipeline models' "
        "process: no BLS call per step; one pipeline process runs concurrent requests on "
        "threads and merges their steps (docs/gpu.md, 'Per-step overhead')",
    )
    p.add_argument(
        "--parameter",
        type=_parameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stable_diffusion config parameter (e.g. max_steps=100); repeatable",
    )
    p.add_argument("--name", help="checkpoint name recorded as 'source' (default: SRC's path)")
    p.add_argument(
        "--no-stream-model",
        action="store_true",
        help="leave out the streaming model (stable_diffusion_stream)",
    )
    gpu = p.add_argument_group("GPU deployment")
    gpu.add_argument(
        "--gpu",
        action="store_true",
        help="KIND_GPU instance groups for every model (default: KIND_CPU)",
    )
    gpu.add_argument(
        "--tensorrt",
        action="store_true",
        help="with --host onnxruntime: TensorRT execution provider (implies --gpu; precision "
        "fp16-vae-auto unless --precision says otherwise; engines FP16 where the weights are)",
    )
    gpu.add_argument(
        "--trt-cache",
        default="/trt_cache",
        metavar="DIR",
        help="TensorRT engine and timing cache folder, as the server sees it (default /trt_cache)",
    )
    gpu.add_argument(
        "--trt-max-size",
        type=int,
        default=None,
        metavar="PX",
        help="same as --parameter max_side=PX: the largest height or width a request may ask "
        "for, where the TensorRT profiles end (default: twice the native size)",
    )
    gpu.add_argument(
        "--component-instances",
        type=int,
        default=1,
        metavar="N",
        help="instances of each component model (per GPU with --gpu; default 1)",
    )
    versions = p.add_argument_group("names and versions")
    versions.add_argument(
        "--model-prefix",
        default="",
        metavar="PREFIX",
        help="prefix every model name (e.g. sd21_): several checkpoints in one repository",
    )
    versions.add_argument(
        "--new-version",
        action="store_true",
        help="add the export as the next version of every model beside the existing ones",
    )
    versions.add_argument(
        "--keep-versions",
        type=int,
        default=2,
        metavar="N",
        help="component versions served at once (version_policy latest N; default 2, so the "
        "pipeline can be rolled back one version)",
    )
    p.add_argument(
        "--controlnet",
        type=_parameter,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="export the ControlNet PATH (a diffusers folder, or a single .safetensors/.ckpt/"
        ".pth file in lllyasviel's or diffusers' layout) beside the UNet as model "
        "controlnet_NAME (and the controlled UNet unet_controlled); requests name it NAME; "
        "repeatable (fp32, ONNX hosts)",
    )
    p.add_argument(
        "--controlnet-config",
        type=_parameter,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a diffusers ControlNet folder whose config.json describes the single-file "
        "--controlnet NAME (default: the shipped config of its family, SD 1.x, SD 2.x or SDXL)",
    )
    single_file.add_arguments(p)
    adapters.add_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def _precision(args: argparse.Namespace) -> Precision:
    """``--precision``, or what ``--fp16`` / ``--fp16-vae-decoder`` / ``--tensorrt`` imply."""
    implied: Precision = "fp32"
    if args.fp16 or args.tensorrt:
        implied = "fp16" if args.fp16_vae_decoder else "fp16-vae-auto"
    if args.precision is None:
        return implied
    if (args.fp16 or args.fp16_vae_decoder) and args.precision != implied:
        raise ExportError(
            f"--precision {args.precision} contradicts --fp16/--fp16-vae-decoder: give one"
        )
    return args.precision


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """The :class:`ExportOptions` the command line asks for."""
    parameters: dict[str, str] = dict(args.parameter)
    size = args.trt_max_size
    if size is not None and parameters.setdefault("max_side", str(size)) != str(size):
        raise ExportError("--trt-max-size and --parameter max_side=... disagree: give one")
    contents = Contents(
        precision=_precision(args),
        safety_checker=not args.no_safety_checker,
        safety_checker_from=args.safety_checker,
        refiner=args.refiner,
        preset=args.preset,
        watermark=args.watermark,
        stream_model=not args.no_stream_model,
        opset=max(args.opset, 18) if args.dynamo else args.opset,
        dynamo=args.dynamo,
        name=args.name,
    )
    hosting = Hosting(
        host=args.host,
        gpu=args.gpu,
        tensorrt=args.tensorrt,
        trt_cache=args.trt_cache,
        component_instances=args.component_instances,
        pipeline_instances=args.pipeline_instances,
        unet_in_pipeline=args.unet_in_pipeline,
        intra_op_threads=args.intra_op_threads,
        unet_max_batch_size=args.unet_max_batch_size,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        preferred_batch_sizes=tuple(args.preferred_batch_size),
    )
    naming = Naming(
        model_prefix=args.model_prefix,
        new_version=args.new_version,
        keep_versions=args.keep_versions,
    )
    return ExportOptions(contents, hosting, naming, parameters)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Our progress lines only; libraries' INFO chatter stays off.
    logging.getLogger("sd_triton").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        options = options_from_args(args)
        with (
            single_file.diffusers_folder(args.src, single_file.options_from_args(args)) as src,
            single_file.refiner_folder(options) as options,
            adapters.fused_checkpoint(src.path, args.lora, args.embedding) as fused,
        ):
            options = fused.options(src.options(options, args.src), args.src)
            export_repository(
                fused.path,
                args.out,
                options,
                overwrite=args.overwrite,
                controlnets=controlnet_sources(args.controlnet, args.controlnet_config),
            )
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
