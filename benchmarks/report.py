"""The harness's results as a markdown table and a plot (latency and throughput vs concurrency)."""

from __future__ import annotations

import json
from pathlib import Path

# Targets the issue asks us to record (not timed tests): (setting prefix, device) -> max overhead at c=1.
# SDXL's architecture has the full-size targets.
OVERHEAD_TARGETS = {
    ("tiny", "cpu"): 1.10,
    ("sd15", "cpu"): 1.03,
    ("sd15", "cuda"): 1.05,
    ("sdxl", "cpu"): 1.03,
    ("sdxl", "cuda"): 1.05,
}


# Foreign load (cores used by other processes) above which a measurement is marked noisy.
NOISY_CORES = 0.25


def _gib(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**30:.2f} GiB"


def _batches(sizes: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0]))) or "-"


def _others(level: dict) -> str:
    cpu = level.get("cpu")
    if not cpu:
        return "-"
    return f"{cpu['served']['others_cores']:.2f} / {cpu['inprocess']['others_cores']:.2f}"


def _load(results: dict, when: str) -> str:
    load = results.get("load_average", {}).get(when)
    return f"{load[0]:.2f}" if load else "n/a"


def header(results: dict) -> list[str]:
    m, v, o = results["machine"], results["versions"], results["options"]
    gpu = m.get("gpu") or "no GPU"
    return [
        f"Measured {results['started']} by `python -m sd_triton.benchmarks.harness` (raw numbers: `raw/`).",
        "",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {gpu}; {m['os']}, Python {m['python']}.",
        "- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- **Settings**: concurrency {', '.join(map(str, o['concurrency']))}; {o['rounds']} round(s) of "
        f"served/in-process alternation per level; in-process on {o['device']} ({o['dtype']}), "
        f"torch threads {o['torch_threads']}; server OMP_NUM_THREADS {o['server_omp_threads'] or 'unset'}.",
        f"- **Load average** (1 min) at start {_load(results, 'start')}, at end {_load(results, 'end')}; "
        "*others' load* in the table is CPU time used by processes other than the server and the "
        "harness during each measurement, in cores: on a shared machine, rows where it is high are noise.",
        "- **Method**: served = closed loop of *c* gRPC clients, one prompt/one image per request; "
        "in-process = the diffusers pipeline of the model's family (`StableDiffusionPipeline`, "
        "`StableDiffusionXLPipeline`) on the checkpoint the repository was exported from, "
        "called **sequentially at every c** (a pipeline is not thread-safe), so its images/s is what one "
        "in-process pipeline gives. Overhead = served seconds per image / in-process seconds per image. "
        "UNet batching from the server's statistics (`get_inference_statistics`, deltas over each served run).",
    ]


def setting_section(s: dict) -> list[str]:
    st = s["setting"]
    lines = [
        f"## {st['name']}: {st['size']} px, {st['steps']} steps, guidance {st['guidance_scale']}",
        "",
        f"Checkpoint `{st['checkpoint']}`, repository `{st['repository']}`"
        + (f", in-process `{st['inprocess_pipeline']}`" if "inprocess_pipeline" in st else "")
        + ". Served image vs in-process "
        f"image (same seed): max difference {s['max_pixel_diff_served_vs_inprocess']} uint8 level(s).",
        "",
        "| c | served p50 s | served p95 s | served img/s | in-proc p50 s | in-proc p95 s | in-proc img/s "
        "| overhead | UNet samples/exec | UNet exec/image | UNet ms/exec | UNet batch sizes (size×execs) "
        "| others' load, cores (served / in-proc) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|",
    ]
    for lv in s["levels"]:
        a, b, u = lv["served"], lv["inprocess"], lv["unet"]
        lines.append(
            f"| {lv['concurrency']} | {a['p50_s']:.3f} | {a['p95_s']:.3f} | {a['images_per_s']:.3f} "
            f"| {b['p50_s']:.3f} | {b['p95_s']:.3f} | {b['images_per_s']:.3f} | {lv['overhead']:.3f}× "
            f"| {u['samples_per_execution']:.2f} | {u['executions_per_image']:.2f} "
            f"| {u['compute_infer_ms_per_execution']:.1f} | {_batches(u['batch_sizes'])} "
            f"| {_others(lv)} |"
        )
    lines += breakdown(s["levels"])
    mem, step = s["memory"], s["unet_per_step"]
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(mem["server_peak_breakdown"].items()))
    lines += [
        "",
        f"Images per level: served {st['requests_per_worker']} per client, in-process {st['inprocess_images']}.",
        f"Server memory, peak RSS over its process tree: **{_gib(mem['server_peak_bytes'])}**"
        + (f" ({parts})" if parts else "")
        + f". Harness process (in-process pipeline + clients): {_gib(mem['harness_peak_bytes'])}.",
        "",
        f"UNet per step at c={step['concurrency']} (server's compute_infer / executions): "
        f"**{step['measured_ms']:.2f} ms** for {step['step_gflop']:.2f} GFLOP "
        f"({'2 samples' if s['work']['guidance'] else '1 sample'}; {s['work']['unet_gflop']:.2f} GFLOP per sample)"
        + (f" = {step['achieved_tflops']:.3f} TFLOP/s achieved" if step["achieved_tflops"] else "")
        + (
            f"; FLOP floor at {step['peak_tflops']:.0f} TFLOP/s: **{step['floor_ms']:.3f} ms**"
            if step["floor_ms"]
            else "; no FLOP floor quoted for a CPU"
        )
        + f". Work per image: {s['work']['image_gflop']:.1f} GFLOP (UNet steps + VAE decoder).",
        "",
    ]
    return lines


def breakdown(levels: list[dict]) -> list[str]:
    """Where a served image's time went (ms per image, server statistics)."""
    known = [lv for lv in levels if lv.get("server_ms_per_image")]
    if not known:
        return []
    fixed = ("pipeline_queue", "pipeline", "pipeline_rest")
    components = list(
        dict.fromkeys(k for lv in known for k in lv["server_ms_per_image"] if k not in fixed)
    )
    lines = [
        "",
        "Where a served image's time goes, ms per image (server statistics; components: queue + "
        "compute of their BLS requests; *rest*: the pipeline's own code and BLS transfers; "
        "*client − server*: gRPC and client):",
        "",
        "| c | client latency (mean) | client − server | pipeline queue | pipeline | "
        + " | ".join(components)
        + " | rest |",
        "|---:|" + "---:|" * (5 + len(components)),
    ]
    for lv in known:
        t = lv["server_ms_per_image"]
        lat = lv["served"]["latencies_s"]
        mean = 1e3 * sum(lat) / len(lat)
        outside = mean - t["pipeline"] - t["pipeline_queue"]
        cells = [f"{t.get(k, 0.0):.1f}" for k in components]
        lines.append(
            f"| {lv['concurrency']} | {mean:.1f} | {outside:.1f} | {t['pipeline_queue']:.1f} "
            f"| {t['pipeline']:.1f} | " + " | ".join(cells) + f" | {t['pipeline_rest']:.1f} |"
        )
    return lines


def _noise(*levels: dict) -> str:
    """' (noisy: others' load N cores)' when any of ``levels`` ran under foreign load."""
    worst = max(
        (
            lv.get("cpu", {}).get(k, {}).get("others_cores", 0.0)
            for lv in levels
            for k in ("served", "inprocess")
        ),
        default=0.0,
    )
    return f" (noisy: others' load {worst:.2f} cores)" if worst > NOISY_CORES else ""


def _verdict(ok: bool, *levels: dict) -> str:
    return ("yes" if ok else "no") + _noise(*levels)


def targets(results: dict) -> list[str]:
    device = results["options"]["device"]
    rows = []
    for s in results["settings"]:
        name = s["setting"]["name"]
        levels = {lv["concurrency"]: lv for lv in s["levels"]}
        limit = next(
            (v for (p, d), v in OVERHEAD_TARGETS.items() if name.startswith(p) and d == device),
            None,
        )
        if 1 in levels and limit:
            got = levels[1]["overhead"]
            rows.append(
                f"| {name}: c=1 served ≤ {limit:.2f}× in-process | {got:.3f}× "
                f"| {_verdict(got <= limit, levels[1])} |"
            )
        if 1 in levels and 4 in levels:
            r1, r4 = levels[1]["served"]["images_per_s"], levels[4]["served"]["images_per_s"]
            ratio = r4 / r1 if r1 else 0.0
            rows.append(
                f"| {name}: c=4 images/s ≥ c=1 | {ratio:.2f}× "
                f"| {_verdict(ratio >= 1, levels[1], levels[4])} |"
            )
            u1, u4 = levels[1]["unet"], levels[4]["unet"]
            merged = u4["samples_per_execution"] > u1["samples_per_execution"]
            rows.append(
                f"| {name}: UNet executions merged at c=4 | {u1['samples_per_execution']:.2f} → "
                f"{u4['samples_per_execution']:.2f} samples/exec, {u1['executions_per_image']:.2f} → "
                f"{u4['executions_per_image']:.2f} exec/image | {'yes' if merged else 'no'} |"
            )
    if not rows:
        return []
    return [
        "## Targets (recorded, not enforced)",
        "",
        "| target | measured | met |",
        "|:---|:---|:---|",
        *rows,
        "",
    ]


def markdown(results: dict, title: str = "sd-triton benchmark") -> str:
    lines = [f"# {title}", "", *header(results), ""]
    for s in results["settings"]:
        lines += setting_section(s)
    if "overhead" in results:
        from .overhead import markdown as overhead_markdown

        lines += [overhead_markdown(results["overhead"]), ""]
    lines += targets(results)
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    for row, s in zip(axes, settings, strict=True):
        c = [lv["concurrency"] for lv in s["levels"]]
        name = f"{s['setting']['name']} ({s['setting']['size']}, {s['setting']['steps']} steps)"
        lat, thr = row
        for side, color, label in (
            ("served", "tab:blue", "served (Triton)"),
            ("inprocess", "tab:orange", "in-process (diffusers, sequential)"),
        ):
            lat.plot(
                c,
                [lv[side]["p50_s"] for lv in s["levels"]],
                "o-",
                color=color,
                label=f"{label} p50",
            )
            lat.plot(
                c,
                [lv[side]["p95_s"] for lv in s["levels"]],
                "^--",
                color=color,
                alpha=0.6,
                label=f"{label} p95",
            )
            thr.plot(
                c, [lv[side]["images_per_s"] for lv in s["levels"]], "o-", color=color, label=label
            )
        noisy = [
            lv["concurrency"]
            for lv in s["levels"]
            if max(
                lv.get("cpu", {}).get(k, {}).get("others_cores", 0.0)
                for k in ("served", "inprocess")
            )
            > NOISY_CORES
        ]
        for ax in row:
            if noisy:
                ax.plot(
                    noisy,
                    [0] * len(noisy),
                    "x",
                    color="grey",
                    ms=9,
                    mew=2,
                    clip_on=False,
                    label=f"others' load > {NOISY_CORES} core",
                )
        lat.set(title=f"{name}: latency per image", xlabel="concurrency", ylabel="seconds")
        thr.set(title=f"{name}: throughput", xlabel="concurrency", ylabel="images / s")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(c, [str(x) for x in c])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        lat.legend(fontsize=7)
        thr.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"sd-triton: {m.get('gpu') or m['cpu']}, {m['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, out_dir: Path, label: str) -> list[Path]:
    """``<label>.md``, ``<label>.png`` and ``raw/<label>.json`` under ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "raw").mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{label}.md"
    md.write_text(markdown(results, f"sd-triton benchmark: {label}"))
    png = [plot(results, out_dir / f"{label}.png")] if results["settings"] else []
    raw = out_dir / "raw" / f"{label}.json"
    raw.write_text(json.dumps(results, indent=1) + "\n")
    return [md, *png, raw]
