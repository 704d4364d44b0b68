"""``sd-triton``: generate images, check health and list models from the command line.

::

    sd-triton generate "a photo of a cat" -o cat.png --steps 20 --seed 123 --size 512x768
    sd-triton img2img "a watercolor" --image in.png --strength 0.6 -o out.png
    sd-triton inpaint "a red armchair" --image in.png --mask mask.png -o out.png
    sd-triton outpaint "a beach" --image in.png --left 64 --right 64 -o wide.png
    sd-triton health
    sd-triton models

Errors are one line on stderr, no traceback; the exit code says what kind
(see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ._edit import img2img_request, inpaint_request, outpaint_request
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    SDTritonError,
    UnavailableError,
)
from ._infotext import output_paths
from ._sync import DEFAULT_URL, Client, PendingGeneration
from ._types import GenerationResult, ProgressEvent

__all__ = ["EXIT_CODES", "main"]

PROG = "sd-triton"
URL_ENV = "SD_TRITON_URL"

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_INVALID = 2  # also argparse's code for a bad command line
EXIT_UNAVAILABLE = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 130  # as a shell reports Ctrl-C

# Most specific first.
EXIT_CODES: dict[type[SDTritonError], int] = {
    InvalidRequestError: EXIT_INVALID,
    UnavailableError: EXIT_UNAVAILABLE,
    DeadlineExceededError: EXIT_TIMEOUT,
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
        "--model", default="stable_diffusion", help="model name (default: %(default)s)"
    )
    common.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )

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
    gen.set_defaults(func=cmd_generate)
    _add_edit_commands(sub, [common, options])

    health = sub.add_parser(
        "health", parents=[common], help="is the server up and the model ready? (exit 0 if so)"
    )
    health.set_defaults(func=cmd_health)

    models = sub.add_parser("models", parents=[common], help="list the server's models")
    models.set_defaults(func=cmd_models)
    return parser


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


_OPTIONS = (
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "num_images_per_prompt",
)


def cmd_generate(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in ("prompt", *_OPTIONS)}
    if args.size:
        options["width"], options["height"] = args.size
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with Client(args.url, model=args.model, stream_model=args.stream_model) as client:
        if progress and not client.health(timeout_s=args.timeout).models[client.stream_model]:
            print(
                f"{PROG}: note: no streaming model {client.stream_model!r}; no progress bar",
                file=sys.stderr,
            )
            progress = False
        run = _generate_with_progress if progress else _generate_unary
        result = run(client, options, args.timeout)
    return _save(result, args.output)


def _open_image(path: Path, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidRequestError(f"cannot read image {path}: {e}") from None


def cmd_edit(args: argparse.Namespace) -> int:
    """img2img, inpaint and outpaint: one unary request (Ctrl-C cancels it on the server)."""
    options = {name: getattr(args, name) for name in _OPTIONS}
    options["strength"] = args.strength
    image = _open_image(args.image, "RGB")
    if args.command == "img2img":
        request = img2img_request(args.prompt, image, **options)
    elif args.command == "inpaint":
        request = inpaint_request(args.prompt, image, _open_image(args.mask, "L"), **options)
    else:
        margins = {k: getattr(args, k) for k in ("left", "right", "top", "bottom", "overlap")}
        request = outpaint_request(args.prompt, image, **margins, **options)
    with Client(args.url, model=args.model) as client:
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
    with Client(args.url, model=args.model) as client:
        health = client.health(timeout_s=args.timeout if args.timeout is not None else 5.0)
    state = lambda ok: "ready" if ok else "NOT ready"  # noqa: E731
    print(f"server {args.url}: {'live' if health.live else 'NOT live'}, {state(health.ready)}")
    for name, ready in health.models.items():
        print(f"model {name}: {state(ready)}")
    ok = health.live and health.ready and health.models[args.model]
    return EXIT_OK if ok else EXIT_UNAVAILABLE


def cmd_models(args: argparse.Namespace) -> int:
    with Client(args.url, model=args.model) as client:
        models = client.list_models(timeout_s=args.timeout if args.timeout is not None else 5.0)
    for m in models:
        line = f"{m.name}\t{m.version or '-'}\t{m.state or '-'}"
        print(f"{line}\t{m.reason}" if m.reason else line)
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
