"""The benchmark harness and perf_analyzer set-up: output well-formed, parts correct.

The server tests run the real harness on the tiny model with one short
setting (seconds, not a measurement); the unit tests check the parts that
turn numbers into a report.
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sd_triton.benchmarks import flops, perf_analyzer, report, stats, system

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ unit tests
def _raw_stats(inferences, executions, infer_ns, batches):
    return {
        "name": "unet",
        "inference_count": str(inferences),
        "execution_count": str(executions),
        "inference_stats": {
            "success": {"count": str(executions), "ns": "1"},
            "compute_infer": {"count": str(executions), "ns": str(infer_ns)},
        },
        "batch_stats": [
            {"batch_size": str(b), "compute_infer": {"count": str(n), "ns": "1"}}
            for b, n in batches.items()
        ],
    }


def test_model_stats_delta_shows_merged_unet_calls():
    before = stats.ModelStats.from_json(_raw_stats(20, 10, 10_000_000, {2: 10}))
    after = stats.ModelStats.from_json(_raw_stats(36, 14, 18_000_000, {2: 10, 4: 2, 6: 2}))
    d = after - before
    assert (d.inference_count, d.execution_count) == (16, 4)
    assert d.samples_per_execution == 4.0
    assert d.batches == {4: 2, 6: 2}
    assert d.ms_per_execution() == pytest.approx(2.0)
    summed = stats.total({"unet": d}, {"unet": d})
    assert summed["unet"].inference_count == 32
    assert summed["unet"].batches == {4: 4, 6: 4}


def test_stable_diffusion_inputs_follow_the_public_contract():
    data = perf_analyzer.stable_diffusion_inputs(height=128, width=96, steps=3, seeds=(5, 6))[
        "data"
    ]
    assert [d["seed"] for d in data] == [[5], [6]]
    assert data[0]["prompt"] == [perf_analyzer.PROMPTS[0]]
    assert {(d["height"][0], d["width"][0], d["num_inference_steps"][0]) for d in data} == {
        (128, 96, 3)
    }


# An fp16 SD 1.5 UNet's config.pbtxt as the exporter writes it (the timestep stays fp32).
SD15_FP16_UNET = """
name: "unet"
max_batch_size: 8
input { name: "sample" data_type: TYPE_FP16 dims: [4, -1, -1] }
input { name: "timestep" data_type: TYPE_FP32 dims: [1] reshape { } }
input { name: "encoder_hidden_states" data_type: TYPE_FP16 dims: [-1, 768] }
output { name: "out_sample" data_type: TYPE_FP16 dims: [4, -1, -1] }
"""


def test_unet_inputs_have_latent_and_text_shapes():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    config = text_format.Parse(SD15_FP16_UNET, pb.ModelConfig())
    constants = {"vae_scale_factor": 8, "tokenizer_max_length": 77}
    entry = perf_analyzer.unet_inputs(config, constants, height=128, width=64)["data"][0]
    assert set(entry) == {"sample", "timestep", "encoder_hidden_states"}
    assert entry["sample"]["shape"] == [4, 16, 8]
    assert entry["encoder_hidden_states"]["shape"] == [77, 768]
    assert len(base64.b64decode(entry["sample"]["b64"])) == 4 * 16 * 8 * 2  # fp16
    assert len(base64.b64decode(entry["timestep"]["b64"])) == 4  # always fp32


def test_sdxl_unet_inputs_come_from_its_config(tmp_path, families_repository):
    """The tiny SDXL base's UNet (``xl_unet``) takes SDXL's added inputs at the widths its
    config.pbtxt declares, and a text sequence of 77 x chunks; the pipeline's models by name."""
    paths = perf_analyzer.write_inputs(
        families_repository, tmp_path, model_prefix="xl_", height=64, width=48, chunks=2
    )
    entry = json.loads(paths["unet"].read_text())["data"][0]
    shapes = {name: value["shape"] for name, value in entry.items()}
    # tiny SDXL: VAE factor 2, text width 32 + 64 = 96, pooled width 32, six time ids
    assert shapes == {
        "sample": [4, 32, 24],
        "timestep": [1],
        "encoder_hidden_states": [154, 96],
        "text_embeds": [32],
        "time_ids": [6],
    }
    constants = perf_analyzer.pipeline_constants(families_repository, "xl_stable_diffusion")
    names = perf_analyzer.model_names(constants)
    assert (names["stable_diffusion"], names["unet"]) == ("xl_stable_diffusion", "xl_unet")
    assert perf_analyzer.composing_models(constants) == (
        "xl_text_encoder",
        "xl_text_encoder_2",
        "xl_unet",
        "xl_vae_decoder",
    )


def test_flop_count_matches_design_for_sd15():
    """DESIGN.md: one SD 1.5 UNet forward at 64x64 latent, batch 1, is 803 GFLOP."""
    from sd_triton.export.tiny import SD15

    work = flops.count_configs(dict(SD15.unet), dict(SD15.vae), height=512, width=512)
    assert work.unet_gflop == pytest.approx(803, rel=0.01)
    assert work.step_gflop == pytest.approx(2 * 803, rel=0.01)
    assert 2000 < work.vae_decoder_gflop < 3000


def test_tree_memory_sums_children():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(50_000_000); time.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            mem = system.tree_memory(child.pid)
            if sum(mem.values()) > 50_000_000:
                break
            time.sleep(0.1)
        assert sum(mem.values()) > 50_000_000
        with system.MemorySampler(child.pid, interval_s=0.05) as sampler:
            time.sleep(0.2)
        assert sampler.peak_bytes >= 50_000_000
    finally:
        child.kill()
        child.wait()


def _fake_results():
    def level(c, served_s, inproc_s, samples):
        lat = [served_s * (1 + 0.1 * i) for i in range(2 * c)]
        return {
            "concurrency": c,
            "served": {
                "images": 2 * c,
                "wall_s": 1.0,
                "images_per_s": 2 * c / (served_s * 2),
                "p50_s": lat[0],
                "p95_s": lat[-1],
                "latencies_s": lat,
            },
            "inprocess": {
                "images": 2,
                "wall_s": 2 * inproc_s,
                "images_per_s": 1 / inproc_s,
                "p50_s": inproc_s,
                "p95_s": inproc_s,
                "latencies_s": [inproc_s] * 2,
            },
            "overhead": 1.05,
            "p50_ratio": 1.05,
            "unet": {
                "samples_per_execution": samples,
                "executions_per_image": 20 / samples,
                "compute_infer_ms_per_execution": 3.0,
                "batch_sizes": {"2": 4},
            },
            "server_stats": {},
            "server_ms_per_image": {
                "pipeline": 900.0,
                "pipeline_queue": 0.1,
                "unet": 800.0,
                "pipeline_rest": 100.0,
            },
            "cpu": {
                side: {
                    "wall_s": 1.0,
                    "server_cpu_s": 1.0,
                    "harness_cpu_s": 0.1,
                    "others_cpu_s": 0.2,
                    "others_cores": 0.2,
                }
                for side in ("served", "inprocess")
            },
        }

    return {
        "started": "now",
        "machine": system.machine(),
        "versions": system.versions("2.51.0"),
        "load_average": {"start": [0.5, 0.4, 0.3], "end": [0.7, 0.5, 0.3]},
        "options": {
            "concurrency": [1, 4],
            "rounds": 1,
            "torch_threads": 2,
            "server_omp_threads": "2",
            "device": "cpu",
            "dtype": "float32",
        },
        "settings": [
            {
                "setting": {
                    "name": "tiny",
                    "checkpoint": "c",
                    "repository": "r",
                    "size": "64x64",
                    "steps": 10,
                    "guidance_scale": 7.5,
                    "requests_per_worker": 2,
                    "inprocess_images": 2,
                },
                "server_version": "2.51.0",
                "max_pixel_diff_served_vs_inprocess": 1,
                "levels": [level(1, 1.0, 0.95, 2.0), level(4, 2.0, 0.95, 5.0)],
                "work": {
                    "unet_gflop": 1.0,
                    "vae_decoder_gflop": 1.6,
                    "guidance": True,
                    "step_gflop": 2.0,
                    "image_gflop": 21.6,
                },
                "memory": {
                    "server_peak_bytes": 2**30,
                    "server_peak_breakdown": {"tritonserver": 2**29, "stub:unet": 2**29},
                    "harness_peak_bytes": 2**29,
                },
                "unet_per_step": {
                    "concurrency": 1,
                    "measured_ms": 3.0,
                    "step_gflop": 2.0,
                    "achieved_tflops": 0.667,
                    "peak_tflops": None,
                    "floor_ms": None,
                },
            }
        ],
    }


def test_report_writes_table_plot_and_raw(tmp_path):
    md, png, raw = report.write(_fake_results(), tmp_path, "unit")
    text = md.read_text()
    assert "| c | served p50 s |" in text
    assert "| tiny: c=1 served ≤ 1.10× in-process | 1.050× | yes |" in text
    assert "UNet executions merged at c=4 | 2.00 → 5.00" in text
    assert "torch" in text and "tritonserver 2.51.0" in text
    assert "| 0.20 / 0.20 |" in text  # others' load
    assert "| c | client latency (mean) |" in text
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(raw.read_text())["settings"][0]["levels"][1]["concurrency"] == 4


# ------------------------------------------------------ against a server
def _check_results(out, label, concurrency, server_pid=True):
    text = (out / f"{label}.md").read_text()
    table = text.split("| c | served p50 s |")[1].split("\n\n")[0]
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    assert [int(r.split("|")[1]) for r in rows] == list(concurrency)
    assert (out / f"{label}.png").read_bytes()[:8] == PNG_MAGIC
    raw = json.loads((out / "raw" / f"{label}.json").read_text())
    (setting,) = raw["settings"]
    for level in setting["levels"]:
        assert level["served"]["images"] >= level["concurrency"]
        assert level["served"]["images_per_s"] > 0 and level["inprocess"]["images_per_s"] > 0
        assert np.isfinite(level["overhead"]) and level["overhead"] > 0
        assert level["unet"]["execution_count"] > 0
        assert level["unet"]["samples_per_execution"] >= 2  # guidance: 2 samples per call
    if server_pid:  # the server's memory is read from its process tree
        assert setting["memory"]["server_peak_bytes"] > 0
    assert setting["max_pixel_diff_served_vs_inprocess"] <= 1  # same weights, same image
    assert raw["versions"]["tritonserver"]
    return raw


@pytest.mark.server
def test_harness_smoke(tmp_path, triton_server, tiny_repository, tiny_checkpoint):
    from sd_triton.benchmarks import harness

    args = ["--repository", str(tiny_repository), "--checkpoint", str(tiny_checkpoint)]
    args += ["--url", triton_server.grpc_url, "--server-pid", str(triton_server.pid)]
    args += [
        "--concurrency",
        "1,2",
        "--steps",
        "2",
        "--requests-per-worker",
        "1",
        "--inprocess-images",
        "1",
        "--warmup",
        "1",
    ]
    args += [
        "--models",
        "repository",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
        "--label",
        "smoke",
    ]
    args += ["--build-dir", str(tmp_path / "build")]
    assert harness.main(args) == 0
    _check_results(tmp_path, "smoke", (1, 2))


@pytest.mark.server
def test_perf_analyzer_runs_over_grpc(tmp_path, build_dir, triton_server, tiny_repository):
    pa = perf_analyzer.setup(build_dir / "perf_analyzer")
    inputs = perf_analyzer.write_inputs(tiny_repository, tmp_path / "inputs", steps=2)
    constants = perf_analyzer.pipeline_constants(tiny_repository)
    out = tmp_path / "sd.csv"
    rows = perf_analyzer.run(
        pa,
        model="stable_diffusion",
        url=triton_server.grpc_url,
        input_data=inputs["stable_diffusion"],
        out_csv=out,
        concurrency=(1, 2),
        requests_per_worker=1,
        composing_models=perf_analyzer.composing_models(constants),
        timeout_s=120,
    )
    assert [r["Concurrency"] for r in rows] == ["1", "2"]
    with open(out, newline="") as f:
        saved = list(csv.DictReader(f))
    assert float(saved[0]["Inferences/Second"]) > 0
    unet_rows = perf_analyzer.run(
        pa,
        model="unet",
        url=triton_server.grpc_url,
        input_data=inputs["unet"],
        out_csv=tmp_path / "unet.csv",
        concurrency=(1,),
        requests_per_worker=2,
        batch_size=2,
        timeout_s=120,
    )
    assert float(unet_rows[0]["Inferences/Second"]) > 0


# ------------------------------------------------------------------ SDXL
def test_sdxl_architecture_reads_the_shipped_configs():
    """At width 1 the builder's UNet and text encoders are SDXL base's configs exactly (its
    derived widths included); at 0.5 every width halves and every depth stays."""
    from sd_triton.benchmarks import random_models
    from sd_triton.export.single_file import config_folder

    folder = config_folder("sdxl-base")
    full = random_models.xl_architecture(1.0)
    for name, built in (
        ("unet", full.unet),
        ("text_encoder", full.text_encoder),
        ("text_encoder_2", full.text_encoder_2),
        ("vae", full.vae),
    ):
        shipped = json.loads((folder / name / "config.json").read_text())
        arguments = {k for k in shipped if not k.startswith("_")} - set(random_models._METADATA)
        assert built == {k: shipped[k] for k in arguments}
    assert full.name == "sdxl-random"
    half = random_models.xl_architecture(0.5)
    assert half.name == "sdxl-w0.5-random"
    assert half.unet["block_out_channels"] == [160, 320, 640]
    assert half.unet["cross_attention_dim"] == 384 + 640
    assert half.unet["projection_class_embeddings_input_dim"] == 640 + 6 * 128
    assert half.text_encoder_2["num_hidden_layers"] == 32
    assert half.unet["transformer_layers_per_block"] == [1, 2, 10]
    assert half.vae == full.vae and half.scheduler == full.scheduler
    with pytest.raises(ValueError, match="do not split into 32 groups"):
        random_models.xl_architecture(0.75)


@pytest.mark.server
def test_harness_sdxl_row(tmp_path, families_url, families_repository, family_checkpoints):
    """An SDXL pipeline (the tiny base under ``xl_`` in the families' server, shared with
    test_sdxl.py) is measured against diffusers' StableDiffusionXLPipeline, chosen by its
    pipeline.json's family, on the same weights: same image, its UNet's statistics, the report."""
    from sd_triton.benchmarks import harness

    args = ["--repository", str(families_repository), "--model-prefix", "xl_"]
    args += ["--url", families_url, "--name", "tiny-sdxl", "--warmup", "1"]
    args += ["--concurrency", "1,2", "--steps", "2", "--requests-per-worker", "1"]
    args += ["--inprocess-images", "1", "--models", "repository", "--no-progress"]
    args += ["--output-dir", str(tmp_path), "--label", "xl", "--build-dir", str(tmp_path / "b")]
    assert harness.main(args) == 0
    raw = _check_results(tmp_path, "xl", (1, 2), server_pid=False)
    (setting,) = raw["settings"]
    assert setting["setting"]["family"] == "sdxl"
    assert setting["setting"]["inprocess_pipeline"] == "StableDiffusionXLPipeline"
    # pipeline.json's source: the checkpoint the base was exported from
    assert Path(setting["setting"]["checkpoint"]).resolve() == family_checkpoints["tiny-sdxl"]
    # the prefixed UNet's statistics, and its work counted with the added conditioning
    assert raw["settings"][0]["levels"][0]["server_stats"]["xl_unet"]["execution_count"] > 0
    assert setting["work"]["unet_gflop"] > 0 and setting["work"]["guidance"]
    assert "in-process `StableDiffusionXLPipeline`" in (tmp_path / "xl.md").read_text()


@pytest.mark.server
def test_perf_analyzer_runs_the_sdxl_unet(tmp_path, build_dir, families_url, families_repository):
    """perf_analyzer drives the tiny SDXL base's UNet with the inputs its config declares
    (text_embeds and time_ids; two prompt chunks): the server accepts every request."""
    pa = perf_analyzer.setup(build_dir / "perf_analyzer")
    inputs = perf_analyzer.write_inputs(
        families_repository, tmp_path / "inputs", model_prefix="xl_", chunks=2
    )
    rows = perf_analyzer.run(
        pa,
        model="xl_unet",
        url=families_url,
        input_data=inputs["unet"],
        out_csv=tmp_path / "xl_unet.csv",
        concurrency=(1,),
        requests_per_worker=2,
        batch_size=2,
        timeout_s=120,
    )
    assert float(rows[0]["Inferences/Second"]) > 0


# ------------------------------------------------------ per-step overhead
def test_paired_per_step_time_cancels_the_fixed_cost():
    from sd_triton.benchmarks import overhead

    # 40 ms per request plus 2 ms per step: the per-step estimate must be 2 ms.
    row = overhead.paired(2, 3, (2, 12), lambda w, steps, i: 0.040 + 0.002 * steps)
    assert row["ms_per_step"] == pytest.approx(2.0)
    assert row["pairs"] == 6
    assert row["ms_per_step_floor"] == pytest.approx(2.0)
    assert row["p50_s"] == {"2": pytest.approx(0.044), "12": pytest.approx(0.064)}


def test_variant_repository_serves_a_null_unet_per_delay(tmp_path, tiny_repository):
    from google.protobuf import json_format

    from sd_triton.benchmarks import overhead
    from sd_triton.export.triton_config import read_config

    variants = [overhead.Variant(2000), overhead.Variant(0), overhead.Variant(0, null_unet=False)]
    variants.append(overhead.Variant(0, null_unet=False, spinning=True))
    variants += [overhead.Variant(0, in_pipeline=True)]
    variants += [overhead.Variant(0, null_unet=False, in_pipeline=True)]
    repo = overhead.variant_repository(tiny_repository, tmp_path / "r", variants, instances=3)
    real = [
        read_config(repo / v.unet).parameters["allow_spinning"].string_value for v in variants[2:4]
    ]
    assert real == ["0", "1"] and variants[3].unet == "d0_real_spin_unet"
    assert [v.pipeline for v in variants[4:]] == [
        "inpipe_null_stable_diffusion",
        "inpipe_real_stable_diffusion",
    ]
    plan = overhead.Plan(request=None, delays_us=(2000, 0))
    assert plan.merge_variants() == [
        overhead.Variant(2000, null_unet=False),
        overhead.Variant(0, null_unet=False),
        overhead.Variant(0, null_unet=False, spinning=True),
        overhead.Variant(0, null_unet=False, in_pipeline=True),
    ]
    assert plan.null_variants() == [*variants[:2], overhead.Variant(0, in_pipeline=True)]
    assert overhead.Plan(request=None, in_pipeline=False).null_variants() == variants[:2]
    source = sorted(
        p.name for p in (tiny_repository / "unet" / "1").iterdir() if p.name != "__pycache__"
    )
    assert "model.onnx" in source
    for v in variants:
        unet = read_config(repo / v.unet)
        assert unet.name == v.unet
        assert unet.dynamic_batching.max_queue_delay_microseconds == v.delay_us
        assert unet.max_batch_size == read_config(tiny_repository / "unet").max_batch_size
        files = sorted(p.name for p in (repo / v.unet / "1").iterdir())
        assert files == (["component_host.py", "model.py"] if v.null_unet else source)
        pipeline = read_config(repo / v.pipeline)
        assert pipeline.name == v.pipeline
        # BLS: 3 instances; the UNet in the pipeline: one instance running 3 requests at once
        assert [g.count for g in pipeline.instance_group] == [1 if v.in_pipeline else 3]
        parameters = {k: p.string_value for k, p in pipeline.parameters.items()}
        assert parameters.get("unet_in_pipeline") == ("1" if v.in_pipeline else None)
        if v.in_pipeline:
            assert parameters["max_concurrency"] == "3"
        constants = json.loads((repo / v.pipeline / "1" / "assets" / "pipeline.json").read_text())
        assert constants["component_models"]["unet"] == v.unet
        # The UNet's config as the in-process host reads it (Triton's JSON form)
        assert constants["unet_config"] == json_format.MessageToDict(
            unet, preserving_proto_field_name=True
        )
    for name in ("d0_null_unet", "inpipe_null_unet"):
        assert (repo / name / "1" / "model.py").read_text() == overhead.NULL_UNET
        host = (repo / name / "1" / "component_host.py").read_text()
        assert host == (tiny_repository / "unet" / "1" / "component_host.py").read_text()
        unet = read_config(repo / name)
        assert unet.backend == "python"
        assert [(g.kind, g.count) for g in unet.instance_group] == [
            (unet.instance_group[0].KIND_CPU, 1)
        ]
    assert read_config(repo / "text_encoder").name == "text_encoder"


def test_a_level_that_fails_because_the_server_died_says_so():
    from types import SimpleNamespace

    from sd_triton.benchmarks import overhead

    def fails(x):
        raise ConnectionError(f"Socket closed {x}")

    dead = SimpleNamespace(_proc=SimpleNamespace(poll=lambda: -11), log_path=Path("/l/ts.log"))
    with pytest.raises(RuntimeError) as e:
        overhead._checked(dead, "inpipe_null_stable_diffusion at c=4, round 1", fails, 1)
    assert str(e.value) == (
        "tritonserver exited with code -11 during inpipe_null_stable_diffusion at c=4, "
        "round 1; its log: /l/ts.log"
    )
    alive = SimpleNamespace(_proc=SimpleNamespace(poll=lambda: None), log_path=None)
    with pytest.raises(ConnectionError):  # the server is up: the error is the level's own
        overhead._checked(alive, "x", fails, 1)
    assert overhead._checked(alive, "x", lambda a, b: a + b, 2, 3) == 5


def test_null_unet_host_runs_served_and_in_the_pipeline(tmp_path, tiny_repository, monkeypatch):
    """The null UNet is a component host: as Triton serves it (requests batched and split back)
    and as a pipeline with unet_in_pipeline loads it (InProcessUNet with pipeline.json's
    unet_config), each call gets its own sample back."""
    import fake_pb_utils

    from sd_pipeline.triton_components import InProcessUNet
    from sd_triton.benchmarks import overhead

    variants = [overhead.Variant(0), overhead.Variant(0, in_pipeline=True)]
    repo = overhead.variant_repository(tiny_repository, tmp_path / "r", variants, instances=2)
    pb = fake_pb_utils.install(monkeypatch)
    rng = np.random.default_rng(0)

    def step(batch):
        return {
            "sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32),
            "timestep": np.full((batch, 1), 999.0, np.float32),
            "encoder_hidden_states": np.zeros((batch, 77, 32), np.float32),
        }

    served = fake_pb_utils.import_model(monkeypatch, repo / "d0_null_unet" / "1" / "model.py")
    model = fake_pb_utils.initialize(served, repo / "d0_null_unet")
    assert model.ARRAYS == "numpy"
    calls = [step(2), step(2)]
    responses = model.execute([fake_pb_utils.request(pb, **c) for c in calls])
    for call, response in zip(calls, responses, strict=True):
        np.testing.assert_array_equal(fake_pb_utils.outputs(response)["out_sample"], call["sample"])

    folder = repo / "inpipe_null_unet" / "1"
    monkeypatch.syspath_prepend(str(folder))  # (InProcessUNet would append it for good)
    monkeypatch.delitem(sys.modules, "component_host", raising=False)
    assets = repo / "inpipe_null_stable_diffusion" / "1" / "assets"
    unet_config = json.loads((assets / "pipeline.json").read_text())["unet_config"]
    runs = []
    unet = InProcessUNet(folder, unet_config, observe=lambda c, rows: runs.append((c, rows)))
    call = step(2)
    out = unet.merger(call)["out_sample"]
    np.testing.assert_array_equal(out, call["sample"])
    assert runs == [(1, 2)]


def test_bls_probe_sends_a_guided_steps_unet_inputs(tmp_path, tiny_repository):
    """The probe's tensors are the UNet's (its config, the request's size, both halves of a
    guided step), and the unbatched null UNet is the batched one without its batcher."""
    from sd_triton.benchmarks import overhead
    from sd_triton.benchmarks.load import Request
    from sd_triton.benchmarks.perf_analyzer import pipeline_constants
    from sd_triton.export.triton_config import read_config

    variants = [overhead.Variant(2000), overhead.Variant(0)]
    repo = overhead.variant_repository(tiny_repository, tmp_path / "r", variants, instances=1)
    request = Request(48, 80, 3)  # not square: height and width must not swap
    targets = overhead.add_bls_probe(tiny_repository, repo, request, batch=2)
    assert targets == ["d0_null_unet", "d2000_null_unet", overhead.UNBATCHED]
    probe = read_config(repo / overhead.PROBE)
    inputs = {n: (d, s) for n, d, s in json.loads(probe.parameters["unet_inputs"].string_value)}
    unet = read_config(tiny_repository / "unet")
    assert list(inputs) == [t.name for t in unet.input]
    f = pipeline_constants(tiny_repository)["vae_scale_factor"]
    assert inputs["sample"] == ("float32", [2, 4, 48 // f, 80 // f])
    assert inputs["timestep"][1][0] == 2 and inputs["encoder_hidden_states"][1][:2] == [2, 77]
    assert (repo / overhead.PROBE / "1" / "model.py").read_text() == overhead.BLS_PROBE
    unbatched = read_config(repo / overhead.UNBATCHED)
    assert unbatched.name == overhead.UNBATCHED and not unbatched.HasField("dynamic_batching")
    assert unbatched.max_batch_size == unet.max_batch_size
    assert (repo / overhead.UNBATCHED / "1" / "model.py").read_text() == overhead.NULL_UNET
    assert (repo / overhead.UNBATCHED / "1" / "component_host.py").is_file()


@pytest.mark.server
def test_harness_overhead_mode(tmp_path, tiny_repository):
    """The null-UNet mode end to end: per-step times, UNet statistics, memory, in the report;
    the pipeline with the UNet in its process beside the BLS one, with the null UNet and, in
    the merging run, the real one."""
    from sd_triton.benchmarks import harness

    args = ["--repository", str(tiny_repository), "--models", "overhead", "--no-progress"]
    args += ["--overhead-concurrency", "1,2", "--overhead-delays", "0"]
    args += ["--overhead-steps", "1,3", "--overhead-requests-per-worker", "1"]
    args += ["--overhead-rounds", "1", "--overhead-probe-calls", "7"]
    args += ["--overhead-merge-rounds", "1", "--overhead-merge-requests-per-worker", "1"]
    args += ["--no-spinning-variant"]
    args += ["--output-dir", str(tmp_path), "--label", "ov", "--build-dir", str(tmp_path / "b")]
    assert harness.main(args) == 0
    result = json.loads((tmp_path / "raw" / "ov.json").read_text())["overhead"]
    served = result["served"]["rows"]
    assert {(r["in_pipeline"], r["concurrency"]) for r in served} == {
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    }
    rows = {r["concurrency"]: r for r in served if not r["in_pipeline"]}
    inpipe = {r["concurrency"]: r for r in served if r["in_pipeline"]}
    assert {r["pipeline"] for r in inpipe.values()} == {"inpipe_null_stable_diffusion"}
    # c=1 with guidance: every UNet execution is one request's pair of samples
    assert rows[1]["unet"]["samples_per_execution"] == 2.0
    assert rows[1]["unet"]["inference_count"] == 2 * (1 + 3)
    assert all(np.isfinite(r["ms_per_step"]) for r in served)
    assert np.isfinite(result["inprocess"]["ms_per_step"])
    # The pipeline's own clock (its sd_denoise_* metrics) counted exactly the level's steps:
    # one pair per worker, 1 + 3 steps.
    for levels in (rows, inpipe):
        assert [levels[c]["loop"]["steps"] for c in (1, 2)] == [4, 8]
        assert all(0 < r["loop_ms_per_step"] < 1e3 for r in levels.values())
    assert 0 < result["inprocess"]["loop_ms_per_step"] < 1e3
    # The UNet in the pipeline: its sd_unet_* metrics counted every step's call and its two
    # samples, and no step called its UNet model by BLS.
    for c, r in inpipe.items():
        u = r["unet"]
        assert (u["request_count"], u["inference_count"]) == (4 * c, 8 * c)
        assert 0 < u["execution_count"] <= u["request_count"]
        assert u["samples_per_execution"] == round(8 * c / u["execution_count"], 3)
        assert r["bls_unet"]["request_count"] == 0 and r["bls_unet"]["inference_count"] == 0
    assert inpipe[1]["unet"]["execution_count"] == 4  # a lone request's steps: one run each
    stubs = [p for p in result["served"]["memory"] if p["label"] == "stub:d0_null_stable_diffusion"]
    assert len(stubs) == 2 and all(0 < p["uss"] <= p["rss"] for p in stubs)
    labels = [p["label"] for p in result["served"]["memory"]]
    assert labels.count("stub:inpipe_null_stable_diffusion") == 1  # one instance
    text = (tmp_path / "ov.md").read_text()
    assert (
        "## Per-step overhead (null UNet)" in text and "stub:d0_null_stable_diffusion | 2 |" in text
    )
    assert f"| BLS, delay 0 µs | 1 | **{rows[1]['loop_ms_per_step']:.3f}** (" in text
    a, b = inpipe[1]["loop_ms_per_step"], rows[1]["loop_ms_per_step"]
    assert f"| in pipeline | 1 | **{a:.3f}** (" in text
    assert f"**c=1: UNet in the pipeline {a:.3f} ms per step vs {b:.3f} by BLS at delay 0" in text
    assert "target ≤ 0.5 ms per step at c=1: **" in text
    # The bare BLS calls: every call timed, through the batcher and without it.
    bls = result["served"]["bls"]
    assert set(bls) == {"d0_null_unet", "unbatched_null_unet"}
    assert all(b["calls"] == 7 and 0 < b["p10"] <= b["p50"] <= b["p90"] < 1e3 for b in bls.values())
    call = bls["d0_null_unet"]["mean"]
    assert f"| d0_null_unet | 7 | **{call:.3f}** |" in text
    assert f"At c=1, delay 0 µs: {rows[1]['loop_ms_per_step']:.3f} ms per served step = " in text
    # Merging, real UNet: the BLS UNet's statistics (Triton's) and the in-pipeline UNet's
    # (its metrics) count the same work, one call of 2 samples per step of every image.
    merging = result["merging"]
    steps = merging["steps"]
    assert {(r["in_pipeline"], r["concurrency"]) for r in merging["rows"]} == {
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    }
    for r in merging["rows"]:
        u = r["unet"]
        assert r["images"] == r["concurrency"]
        assert (u["request_count"], u["inference_count"]) == (
            steps * r["images"],
            2 * steps * r["images"],
        )
        assert 0 < u["execution_count"] <= u["request_count"] and r["images_per_s"] > 0
        assert r.get("bls_unet", {"request_count": 0})["request_count"] == 0
    m = {(r["in_pipeline"], r["concurrency"]): r for r in merging["rows"]}
    ratio = m[True, 2]["images_per_s"] / m[False, 2]["images_per_s"]
    assert (
        f"**c=2, real UNet: in the pipeline {m[True, 2]['images_per_s']} images/s vs "
        f"{m[False, 2]['images_per_s']} by BLS at delay 0 µs ({ratio:.2f}×).**" in text
    )
    assert f"`sd_unet_executions_total` = {m[True, 2]['unet']['requests_per_execution']})" in text
