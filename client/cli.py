"""``sd-triton``: generate images, check health and list models from the command line.

::

    sd-triton generate "a photo of a cat" -o cat.png --steps 20 --seed 123 --size 512x768
    sd-triton generate "a lighthouse" --clip-skip 1 --guidance-rescale 0.7 --enable-hr
    sd-triton generate "a castle" --prompt-2 "oil painting" --original-size 2048x2048 \
        --crops-coords-top-left 0,0 --refiner-switch-at 0.8      # SDXL
    sd-triton img2img "a watercolor" --image in.png --strength 0.6 -o out.png
    sd-triton inpaint "a red armchair" --image in.png --mask mask.png -o out.png
    sd-triton outpaint "a beach" --image in.png --left 64 --right 64 -o wide.png
    sd-triton health
    sd-triton models                    # admin calls: models, load, unload
    sd-triton load stable_diffusion --versions 1
    sd-triton verify --golden golden/   # golden-set check; --write-golden, --against

Errors are one line on stderr, no traceback; the exit code says what kind
(see :data:`EXIT_CODES`). The admin key is read from ``--admin-key-file``,
``$SD_TRITON_ADMIN_KEY_FILE`` or ``$SD_TRITON_ADMIN_KEY``, never from the
command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import TextIO

from sd_pipeline import spec as S

from ._core import DEFAULT_URL, load_waves
from ._edit import MARGINS, img2img_request, inpaint_request, outpaint_request
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    PermissionDeniedError,
    SDTritonError,
    UnavailableError,
)
from ._infotext import output_paths
from ._request import IMAGE_INPUTS, GenerationRequest
from ._sync import Client, PendingGeneration
from ._types import GenerationResult, ProgressEvent
from .control import add_control_options, with_modules

__all__ = ["EXIT_CODES", "main"]

PROG = "sd-triton"
URL_ENV = "SD_TRITON_URL"

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_INVALID = 2  # also argparse's code for a bad command line
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_PERMISSION = 5  # an admin call without the right admin key
EXIT_VERIFY_FAILED = 1  # verify: an image differs by more than the thresholds
EXIT_CANCELLED = 130  # as a shell reports Ctrl-C

# The commands that make admin calls, and so send the admin key.
ADMIN_COMMANDS = ("models", "load", "unload")

# Most specific first.
EXIT_CODES: dict[type[SDTritonError], int] = {
    InvalidRequestError: EXIT_INVALID,
    UnavailableError: EXIT_UNAVAILABLE,
    DeadlineExceededError: EXIT_TIMEOUT,
    PermissionDeniedError: EXIT_PERMISSION,
    CancelledError: EXIT_CANCELLED,
    SDTritonError: EXIT_SERVER_ERROR,
}


def _size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (as the web UI writes Size) -> (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 512x768, got {text!r}"
        ) from None
    return width, height


def _size_pair(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> diffusers' (height, width) pair."""
    width, height = _size(text)
    return height, width


def _top_left(text: str) -> tuple[int, int]:
    """``TOP,LEFT`` -> (top, left), diffusers' crops_coords_top_left."""
    try:
        top, left = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TOP,LEFT in pixels, e.g. 0,256, got {text!r}"
        ) from None
    return top, left


def _png_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the output must be a .png file, got {text!r}")
    return path


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"server gRPC address (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    common.add_argument(
        "--model",
        default="stable_diffusion",
        metavar="MODEL[:VERSION]",
        help="model name, and version (default: %(default)s, its latest version)",
    )
    common.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )
    _add_connection_options(common)

    parser = argparse.ArgumentParser(prog=PROG, description="Stable Diffusion on a Triton server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    options = argparse.ArgumentParser(add_help=False)
    gen = options
    gen.add_argument("prompt")
    gen.add_argument(
        "-o",
        "--output",
        type=_png_path,
        default=Path("out.png"),
        help="PNG path; several images go to OUT.png, OUT-1.png, ... (default: %(default)s)",
    )
    gen.add_argument("--negative", dest="negative_prompt", help="negative prompt")
    gen.add_argument("--steps", dest="num_inference_steps", type=int, help="denoising steps")
    gen.add_argument("--guidance", dest="guidance_scale", type=float, help="guidance scale (CFG)")
    gen.add_argument("--seed", type=int, help="seed (default: random; written into the PNG)")
    gen.add_argument("--scheduler", help="ddim, pndm, lms, euler, euler_a, heun, dpmpp_2m, ...")
    gen.add_argument("--num-images", dest="num_images_per_prompt", type=int, help="images to make")
    _add_conditioning_options(gen)

    gen = sub.add_parser(
        "generate",
        parents=[common, options],
        help="generate images for a prompt",
        description="Generate images; each PNG carries its settings as AUTOMATIC1111 'parameters' text. "
        "Omitted options take the server's defaults.",
    )
    gen.add_argument("--size", type=_size, metavar="WxH", help="image size, e.g. 512x768")
    gen.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar from the streaming model (default: when stderr is a terminal)",
    )
    gen.add_argument(
        "--stream-model", help="streaming model for --progress (default: MODEL_stream)"
    )
    _add_hires_options(gen)
    add_control_options(gen)
    gen.set_defaults(func=cmd_generate)
    _add_edit_commands(sub, [common, options])

    health = sub.add_parser(
        "health", parents=[common], help="is the server up and the model ready? (exit 0 if so)"
    )
    health.set_defaults(func=cmd_health)

    models = sub.add_parser("models", parents=[common], help="list the server's models (admin)")
    models.set_defaults(func=cmd_models)
    load = sub.add_parser("load", parents=[common], help="load or reload a model (admin)")
    load.add_argument("name", nargs="?", help="model to load")
    load.add_argument(
        "--versions", type=int, nargs="+", metavar="N", help="serve exactly these versions"
    )
    load.add_argument(
        "--all",
        action="store_true",
        help="load every model of one export (its components, refiner, ControlNets), the "
        "components first and the pipelines last: a new version's rollout "
        "(sd-triton-export --new-version)",
    )
    load.add_argument(
        "--prefix",
        default="",
        metavar="PREFIX",
        help="with --all: the export's --model-prefix (default: none)",
    )
    load.set_defaults(func=cmd_load)
    unload = sub.add_parser("unload", parents=[common], help="unload a model (admin)")
    unload.add_argument("name", help="model to unload")
    unload.set_defaults(func=cmd_unload)
    _add_verify_command(sub, [common])
    for command in sub.choices.values():
        # No abbreviations: "--admin-key VALUE" must not pass as --admin-key-file.
        command.allow_abbrev = False
    return parser


def _add_conditioning_options(gen: argparse.ArgumentParser) -> None:
    """Text-encoder and guidance options for every family, and SDXL's conditioning."""
    gen.add_argument(
        "--clip-skip",
        type=int,
        metavar="N",
        help="text encoder layers to skip from the end, as diffusers' clip_skip "
        "(the web UI's 'Clip skip 2' is 1)",
    )
    gen.add_argument(
        "--guidance-rescale",
        type=float,
        metavar="PHI",
        help="in [0, 1]: diffusers' guidance_rescale",
    )
    gen.add_argument(
        "--prompt-syntax",
        metavar="SYNTAX",
        help="a1111 (weights, BREAK, 75-token chunks) or diffusers (literal, 77 tokens); "
        "default: the model's",
    )
    xl = gen.add_argument_group("SDXL (sizes WIDTHxHEIGHT, crops TOP,LEFT, as diffusers' inputs)")
    xl.add_argument(
        "--prompt-2", metavar="TEXT", help="text for the second text encoder (default: the prompt)"
    )
    xl.add_argument(
        "--negative-prompt-2",
        "--negative-2",
        dest="negative_prompt_2",
        metavar="TEXT",
        help="negative text for the second text encoder (default: the negative prompt)",
    )
    for prefix, what in (("", "size conditioning"), ("negative-", "negative size conditioning")):
        sizes = f"{what} (default: the output size)"
        xl.add_argument(f"--{prefix}original-size", type=_size_pair, metavar="WxH", help=sizes)
        xl.add_argument(
            f"--{prefix}crops-coords-top-left",
            type=_top_left,
            metavar="TOP,LEFT",
            help=f"{what} (default: 0,0)",
        )
        xl.add_argument(f"--{prefix}target-size", type=_size_pair, metavar="WxH", help=sizes)
    for prefix in ("", "negative-"):
        xl.add_argument(
            f"--{prefix}aesthetic-score", type=float, metavar="SCORE", help="refiner conditioning"
        )
    xl.add_argument(
        "--refiner-switch-at",
        type=float,
        metavar="FRACTION",
        help="in (0, 1): hand the latents to the refiner beside the model after this much "
        "of the schedule",
    )


def _add_hires_options(gen: argparse.ArgumentParser) -> None:
    """The web UI's hires fix (text-to-image)."""
    hires = gen.add_argument_group("hires fix (a second, img2img pass at a larger size)")
    hires.add_argument("--enable-hr", action="store_const", const=True, help="run the second pass")
    hires.add_argument("--hr-scale", type=float, metavar="X", help="upscale by (default 2)")
    hires.add_argument(
        "--hr-upscaler", metavar="NAME", help="latent (default), latent_bicubic, lanczos, ..."
    )
    hires.add_argument(
        "--hr-denoising-strength", type=float, metavar="S", help="the second pass's strength"
    )
    hires.add_argument(
        "--hr-second-pass-steps", type=int, metavar="N", help="the second pass's steps"
    )


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    """The admin key (from a file or the environment) and gRPC TLS."""
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the admin key for admin calls (default: ${S.ADMIN_KEY_FILE_ENV}, "
        f"else ${S.ADMIN_KEY_ENV})",
    )
    parser.add_argument("--ssl", action="store_true", help="speak TLS to the gRPC port")
    for flag, what in (
        ("--root-certificates", "CA certificates to trust (PEM; default: the system's)"),
        ("--private-key", "client private key (PEM), for servers that want client certificates"),
        ("--certificate-chain", "client certificate chain (PEM)"),
    ):
        parser.add_argument(flag, type=Path, metavar="PEM", help=f"with --ssl: {what}")


def _admin_key(args: argparse.Namespace) -> str | None:
    """--admin-key-file, else the file $SD_TRITON_ADMIN_KEY_FILE names, else $SD_TRITON_ADMIN_KEY."""
    path = args.admin_key_file or os.environ.get(S.ADMIN_KEY_FILE_ENV)
    if not path:
        return os.environ.get(S.ADMIN_KEY_ENV) or None
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise InvalidRequestError(f"cannot read the admin key file {path}: {e.strerror}") from None
    if not key:
        raise InvalidRequestError(f"the admin key file {path} is empty")
    return key


def _client(args: argparse.Namespace, **options) -> Client:
    """A Client for the common options: address, model, admin key, TLS."""
    tls = {k: getattr(args, k) for k in ("root_certificates", "private_key", "certificate_chain")}
    if not args.ssl and any(tls.values()):
        raise InvalidRequestError(
            "--root-certificates, --private-key and --certificate-chain need --ssl"
        )
    model, _, version = options.pop("model", args.model).partition(":")
    options = {"model": model, "model_version": version, **options}
    admin_key = _admin_key(args) if args.command in ADMIN_COMMANDS else None
    return Client(args.url, admin_key=admin_key, ssl=args.ssl, **tls, **options)


def _add_edit_commands(sub, parents: list[argparse.ArgumentParser]) -> None:
    """img2img, inpaint, outpaint: generate's options plus --image (and --mask, margins)."""
    size_note = (
        "The output has the image's size (a multiple of the model's size step, 64 px for SD 1.x)."
    )
    edit = argparse.ArgumentParser(add_help=False)
    edit.add_argument(
        "--image", type=Path, required=True, help="source image (any format Pillow reads)"
    )
    edit.add_argument("--strength", type=float, help="in (0, 1]: how much of the schedule runs")
    img2img = sub.add_parser(
        "img2img",
        parents=[*parents, edit],
        help="generate from an image",
        description=f"Generate from --image (default strength 0.8). {size_note}",
    )
    img2img.set_defaults(func=cmd_edit)
    inpaint = sub.add_parser(
        "inpaint",
        parents=[*parents, edit],
        help="repaint the masked part of an image",
        description=f"Repaint --image where --mask is white (default strength 1.0). {size_note}",
    )
    inpaint.add_argument("--mask", type=Path, required=True, help="mask image: white = repaint")
    inpaint.set_defaults(func=cmd_edit)
    outpaint = sub.add_parser(
        "outpaint",
        parents=[*parents, edit],
        help="extend an image by margins and paint them",
        description="Extend --image by the margins (pixels; edge colours fill them) and inpaint "
        "them. The canvas must be a multiple of the model's size step.",
    )
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, metavar="PX", help=f"{side} margin")
    outpaint.add_argument(
        "--overlap", type=int, default=0, metavar="PX", help="also repaint this far into the image"
    )
    outpaint.set_defaults(func=cmd_edit)


class ProgressBar:
    """A one-line text progress bar on a terminal stream."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.shown = False

    def update(self, event: ProgressEvent) -> None:
        filled = round(self.width * event.fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r[{bar}] {event.step}/{event.total_steps} steps  {event.elapsed_s:5.1f} s"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def _generate_with_progress(
    client: Client, options: dict, timeout: float | None
) -> GenerationResult:
    bar = ProgressBar(sys.stderr)
    try:
        with client.stream(timeout_s=timeout, **options) as stream:
            for event in stream:
                if isinstance(event, ProgressEvent):
                    bar.update(event)
    finally:
        bar.close()
    assert stream.result is not None
    return stream.result


def _generate_unary(client: Client, options: dict, timeout: float | None) -> GenerationResult:
    pending = client.submit(timeout_s=timeout, **options)
    try:
        return pending.result()
    except KeyboardInterrupt:
        pending.cancel()  # the server stops too
        raise


# The request options the generation commands set by name (the size and the images
# have their own flags; generate alone has the hires fix's).
_OPTIONS = tuple(
    f.name
    for f in fields(GenerationRequest)
    if f.name not in ("prompt", "height", "width", "preview", *IMAGE_INPUTS)
)


def _request_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name, None) for name in _OPTIONS}


def cmd_generate(args: argparse.Namespace) -> int:
    options = {"prompt": args.prompt, **_request_options(args)}
    if args.size:
        options["width"], options["height"] = args.size
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with _client(args, stream_model=args.stream_model) as client:
        if progress and not client.health(timeout_s=args.timeout).models[client.stream_model]:
            print(
                f"{PROG}: note: no streaming model {client.stream_model!r}; no progress bar",
                file=sys.stderr,
            )
            progress = False
        run = _generate_with_progress if progress else _generate_unary
        result = run(client, options, args.timeout)
    return _save(with_modules(result, args.control_module), args.output)


def _open_image(path: Path, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequestError(f"cannot read image {path}: {e}") from None


def cmd_edit(args: argparse.Namespace) -> int:
    """img2img, inpaint and outpaint: one unary request (Ctrl-C cancels it on the server)."""
    options = _request_options(args)
    options["strength"] = args.strength
    image = _open_image(args.image, "RGB")
    if args.command == "img2img":
        request = img2img_request(args.prompt, image, **options)
    elif args.command == "inpaint":
        request = inpaint_request(args.prompt, image, _open_image(args.mask, "L"), **options)
    else:
        margins = {k: getattr(args, k) for k in MARGINS}
        request = outpaint_request(args.prompt, image, **margins, **options)
    with _client(args) as client:
        pending = PendingGeneration(client, request, args.timeout)
        try:
            result = pending.result()
        except KeyboardInterrupt:
            pending.cancel()
            raise
    return _save(result, args.output)


def _save(result: GenerationResult, output: Path) -> int:
    paths = result.save(output)
    assert paths == output_paths(output, len(result.images))
    for path, flagged in zip(paths, result.nsfw_content_detected, strict=True):
        print(path)
        if flagged:
            print(f"{PROG}: note: {path} was flagged by the safety checker", file=sys.stderr)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        health = client.health(timeout_s=args.timeout if args.timeout is not None else 5.0)
    state = lambda ok: "ready" if ok else "NOT ready"  # noqa: E731
    print(f"server {args.url}: {'live' if health.live else 'NOT live'}, {state(health.ready)}")
    for name, ready in health.models.items():
        print(f"model {name}: {state(ready)}")
    ok = health.live and health.ready and health.models[client.model]
    return EXIT_OK if ok else EXIT_UNAVAILABLE


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models(timeout_s=args.timeout if args.timeout is not None else 5.0)
    for m in models:
        line = f"{m.name}\t{m.version or '-'}\t{m.state or '-'}"
        print(f"{line}\t{m.reason}" if m.reason else line)
    return EXIT_OK


def _add_verify_command(sub, parents: list[argparse.ArgumentParser]) -> None:
    verify = sub.add_parser(
        "verify",
        parents=parents,
        help="golden-set check: render fixed prompts and seeds and compare (exit 1 if any differ)",
        description="Render the golden set's cases with --model at --url and compare every image "
        "with the golden PNGs (--golden), or with another model/version or server (--against, "
        "--against-url); --write-golden stores the renders instead. Prints each image's largest "
        "difference (uint8 levels) and PSNR; exit 0 when all are within the thresholds, 1 if not.",
    )
    verify.add_argument(
        "--cases", type=Path, metavar="JSON", help="golden set (default: the one shipped)"
    )
    mode = verify.add_mutually_exclusive_group(required=True)
    mode.add_argument("--golden", type=Path, metavar="DIR", help="compare with these golden PNGs")
    mode.add_argument("--write-golden", type=Path, metavar="DIR", help="store the renders here")
    mode.add_argument(
        "--against", metavar="MODEL[:VERSION]", help="compare with this model (and version)"
    )
    mode.add_argument("--against-url", metavar="URL", help="compare with the model at this server")
    verify.add_argument(
        "--max-diff",
        type=int,
        default=1,
        metavar="LEVELS",
        help="largest allowed difference, uint8 levels (default: %(default)s)",
    )
    verify.add_argument(
        "--min-psnr", type=float, default=0.0, metavar="DB", help="smallest allowed PSNR (dB)"
    )
    verify.set_defaults(func=cmd_verify)


def _reference_client(args: argparse.Namespace) -> Client:
    if args.against_url:
        args = argparse.Namespace(**{**vars(args), "url": args.against_url})
        return _client(args)
    return _client(args, model=args.against)


def cmd_verify(args: argparse.Namespace) -> int:
    from . import verify

    cases = verify.load_cases(args.cases)
    with _client(args) as client:
        rendered = verify.render(client, cases, timeout_s=args.timeout)
    if args.write_golden:
        for path in verify.write_golden(rendered, args.write_golden):
            print(path)
        return EXIT_OK
    if args.golden:
        expected = verify.read_golden(args.golden, cases)
    else:
        with _reference_client(args) as reference:
            rendered_again = verify.render(reference, cases, timeout_s=args.timeout)
        expected = {name: verify.pixels(r) for name, r in rendered_again.items()}
    actual = {name: verify.pixels(r) for name, r in rendered.items()}
    checks = verify.compare(expected, actual, max_diff=args.max_diff, min_psnr=args.min_psnr)
    for c in checks:
        verdict = "ok" if c.passed else "FAIL"
        note = f"  ({c.note})" if c.note else ""
        print(f"{c.image}\tmax_diff={c.max_diff}\tpsnr={c.psnr:.2f} dB\t{verdict}{note}")
    failed = [c.image for c in checks if not c.passed]
    if failed:
        print(
            f"{PROG}: verify: {len(failed)} of {len(checks)} images differ: {', '.join(failed)}",
            file=sys.stderr,
        )
        return EXIT_VERIFY_FAILED
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    if args.all == (args.name is not None):
        raise InvalidRequestError("name one model to load, or give --all (not both)")
    if args.all and args.versions:
        raise InvalidRequestError("--versions pins one model's versions: name it, without --all")
    if args.prefix and not args.all:
        raise InvalidRequestError("--prefix chooses the models of --all: give --all too")
    with _client(args) as client:
        if args.all:
            return _load_all(client, args.prefix, args.timeout)
        client.load_model(args.name, versions=args.versions, timeout_s=args.timeout)
    print(f"loaded {args.name}" + (f" versions {args.versions}" if args.versions else ""))
    return EXIT_OK


def _load_all(client: Client, prefix: str, timeout_s: float | None) -> int:
    """Load the components of the export with ``--model-prefix`` ``prefix`` side by side,
    then, when every one loaded, its pipelines; one line per model loaded."""
    components, pipelines = load_waves(
        (m.name for m in client.list_models(timeout_s=timeout_s)), prefix
    )
    if not pipelines and not components:
        raise InvalidRequestError(
            f"the server's repository has no model of an export with --model-prefix {prefix!r}"
        )

    def load(name: str, then: str = "") -> str:
        try:
            client.load_model(name, timeout_s=timeout_s)
        except SDTritonError as e:
            raise type(e)(f"loading {name} failed: {_one_line(e)}{then}", status=e.status) from e
        return name

    held = f"; the pipelines ({', '.join(pipelines)}) were not loaded" if pipelines else ""
    # Each wave's loads side by side: the server loads models in parallel.
    with ThreadPoolExecutor(max(1, len(components), len(pipelines))) as pool:
        for name in pool.map(lambda n: load(n, held), components):
            print(f"loaded {name}")
        for name in pool.map(load, pipelines):
            print(f"loaded {name}")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unload_model(args.name, timeout_s=args.timeout)
    print(f"unloaded {args.name}")
    return EXIT_OK


def _one_line(error: SDTritonError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SDTritonError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return next(code for cls, code in EXIT_CODES.items() if isinstance(e, cls))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
