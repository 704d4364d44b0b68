"""``make demo``: serve an exported repository and generate one image with the CLI.

Starts the pip-installed tritonserver on the repository (free ports), runs
``sd-triton generate`` against it exactly as a user would (progress bar
included), prints where the image is, and stops the server.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from sd_triton.server import ServerError, TritonServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_triton.demo", description=__doc__)
    parser.add_argument("--repository", required=True)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    parser.add_argument("--output", default="build/out/demo.png")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = TritonServer(args.repository)
        server.start(timeout_s=300)
    except ServerError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    try:
        print(f"tritonserver ready on {server.grpc_url}", flush=True)
        cli = Path(sys.executable).parent / "sd-triton"
        cmd = [
            str(cli), "generate", args.prompt,
            "--url", server.grpc_url,
            "--steps", str(args.steps),
            "--seed", str(args.seed),
            "-o", str(output),
        ]  # fmt: skip
        code = subprocess.run(cmd).returncode
    finally:
        server.stop()
    if code != 0:
        print(f"demo: generation failed (exit {code})", file=sys.stderr)
        return code
    print(f"image written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
