"""``make gpu-check``: its CPU dry mode end to end, and the parts that judge its numbers.

The dry run is the GPU script with the tiny model on the CPU (torch host,
fp32, 64x64, 2 and 3 steps): build, export, serve, compare with diffusers,
measure, write the results file. It keeps the script from rotting between
the rare runs on a borrowed GPU.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sd_triton.benchmarks import gpu_check


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def test_compare_passes_within_one_level_and_fails_beyond():
    ref = [_image(0), _image(1)]
    near = [np.clip(x.astype(np.int16) + 1, 0, 255).astype(np.uint8) for x in ref]
    assert gpu_check.compare(near, ref, gpu_check.TOLERANCES["fp32"])["ok"]
    far = [near[0], near[1].copy()]
    far[1][0, 0, 0] = (int(ref[1][0, 0, 0]) + 2) % 256
    result = gpu_check.compare(far, ref, gpu_check.TOLERANCES["fp32"])
    assert not result["ok"] and result["max_levels"] >= 2


def test_compare_refuses_flat_references():
    """A black (safety-checked) or NaN image on both sides is equal and proves nothing."""
    black = [np.zeros((8, 8, 3), np.uint8)] * 2
    result = gpu_check.compare(black, black, gpu_check.TOLERANCES["fp32"])
    assert result["max_levels"] == 0 and not result["ok"]


def test_fp16_tolerance_is_looser_than_the_contract():
    fp16, fp32 = gpu_check.TOLERANCES["fp16"], gpu_check.TOLERANCES["fp32"]
    assert fp32.max_levels == 1 and fp32.within_one == 1.0
    assert fp16.max_levels > fp32.max_levels and fp16.why


def test_full_plan_is_the_issue_s_measurement():
    plan = gpu_check.FULL
    assert (plan.name, plan.device, plan.precision, plan.host) == (
        "sd15-random",
        "cuda",
        "fp16",
        "torch",
    )
    assert (plan.size, plan.steps, plan.concurrency) == (512, (20, 50), (1, 4))


def test_gpu_check_refuses_a_machine_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.check_host(gpu_check.FULL)


@pytest.mark.server
def test_gpu_check_dry_run(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(gpu_check, "DRY", replace(gpu_check.DRY, steps=(2, 3), seeds=(0, 1, 2)))
    args = ["--dry", "--checkpoint", str(tiny_checkpoint), "--build-dir", str(tmp_path / "b")]
    args += ["--output-dir", str(tmp_path / "results")]
    assert gpu_check.main(args) == 0
    result = json.loads((tmp_path / "results" / "raw" / "cpu-dry.json").read_text())
    check = result["image_check"]
    assert check["ok"] and check["max_levels"] <= 1 and check["images"] == 3
    assert set(result["served"]["s_per_image"]) == {"2", "3"}
    assert set(result["inprocess"]["s_per_image"]) == {"2", "3"}
    levels = {lv["concurrency"]: lv for lv in result["served"]["levels"]}
    assert set(levels) == {1, 2}
    # c=1 with guidance: 2 samples per UNet execution, at least one execution per step
    assert levels[1]["unet"]["samples_per_execution"] == 2.0
    assert levels[1]["unet"]["executions_per_image"] >= 2.0  # PNDM: 2 steps, 3 UNet calls
    assert result["unet_per_step"]["measured_ms"] > 0
    # What serving adds per step (#13): the loop's clock holds each UNet call's compute.
    step = result["served"]["per_step"]
    assert 0 < step["unet_compute_ms"] < step["loop_ms"] < 1e4
    assert step["overhead_ms"] == round(step["loop_ms"] - step["unet_compute_ms"], 4)
    assert result["unet_per_step"]["floor_ms"] is None  # no FLOP peak claimed for a CPU
    assert any(p["label"] == "stub:stable_diffusion" for p in result["memory"]["rss"])
    text = (tmp_path / "results" / "cpu-dry.md").read_text()
    assert "**PASS** over 3 seeds" in text and "| 3 |" in text
    assert f"**{step['overhead_ms']} ms per step added by serving**" in text
    # The same pipeline with the UNet in its process: same images, its steps counted and
    # merged in its own process (the sd_unet_* metrics), none through Triton's UNet.
    ip = result["in_pipeline"]
    assert ip["image_check"]["ok"] and ip["image_check"]["max_levels"] <= 1
    assert set(ip["s_per_image"]) == {"2", "3"}
    ip_levels = {lv["concurrency"]: lv for lv in ip["levels"]}
    assert set(ip_levels) == {1, 2}
    one = ip_levels[1]["unet"]
    assert one["samples_per_execution"] == 2.0 and one["requests_per_execution"] == 1.0
    assert one["execution_count"] == 3  # one image, PNDM's 2 steps: 3 UNet calls
    assert ip_levels[2]["unet"]["request_count"] == 2 * 3
    assert ip["per_step"]["loop_ms"] > 0
    assert ip["per_step"]["unet_compute_ms"] == step["unet_compute_ms"]
    assert "## The UNet in the pipeline's process" in text
    assert text.count("**PASS**") == 2


# ------------------------------------------------------------ wheels for the GPU machine
def test_wheels_split_into_parts_under_the_limit(tmp_path):
    from sd_triton.benchmarks import gpu_wheels

    sizes = {"a": 50, "b": 30, "c": 20, "d": 15, "e": 5}
    wheels = []
    for name, size in sizes.items():
        path = tmp_path / f"{name}.whl"
        path.write_bytes(b"x" * size)
        wheels.append(path)
    parts = gpu_wheels.split(wheels, limit=60)
    assert sorted(w.name for part in parts for w in part) == sorted(w.name for w in wheels)
    assert all(sum(w.stat().st_size for w in part) <= 60 for part in parts)
    assert len(parts) == 3  # 50 fits beside 5 only, so two parts of 60 cannot hold 120


def test_repack_drops_files_and_rewrites_record(tmp_path):
    import zipfile

    from sd_triton.benchmarks import gpu_wheels

    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("w/__init__.py", "import heavy\n")
        z.writestr("w/stubs/3.12/stub", "keep")
        z.writestr("w/stubs/3.13/stub", "drop")
        z.writestr("w-1.0.dist-info/RECORD", "stale\n")
    out = tmp_path / "out"
    out.mkdir()
    repacked = gpu_wheels.repack(
        wheel, out, lambda n: "/3.13/" in n, {"w/__init__.py": b"# light\n"}
    )
    with zipfile.ZipFile(repacked) as z:
        names = set(z.namelist())
        assert "w/stubs/3.13/stub" not in names and "w/stubs/3.12/stub" in names
        assert z.read("w/__init__.py") == b"# light\n"
        record = z.read("w-1.0.dist-info/RECORD").decode().splitlines()
    assert {line.split(",")[0] for line in record} == names
    assert any(line.startswith("w/__init__.py,sha256=") and line.endswith(",8") for line in record)
