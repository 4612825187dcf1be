"""The speed bench's output: the table it prints and the JSON file it writes (every figure and
every single run; keys described in :mod:`fasterrcnn.bench.speed`)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

COLUMN = 22

RATIOS = (
    ("train_ratio", "training step ours / torchvision"),
    ("infer_ratio", "inference ours / torchvision"),
    ("train_cpu_ratio", "  the same in CPU time: training"),
    ("infer_cpu_ratio", "  the same in CPU time: inference"),
    ("train_ratio_same_settings", "training ours / torchvision, our settings"),
    ("infer_ratio_same_settings", "inference ours / torchvision, our settings"),
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def _row(label: str, cells: list[str]) -> str:
    return f"{label:34}" + "".join(f"{c:>{COLUMN}}" for c in cells)


def table(result: dict) -> str:
    """The bench's summary: medians per contender, the ratios, our time split, data loading,
    the machine and, when measured, bf16's validation mAP."""
    names = list(result["train_s"])
    lines = [_row("", names)]
    for key, label in (
        ("train_s", "training step (ms, median)"),
        ("infer_s", "inference per image (ms, median)"),
        ("train_cpu_s", "training step, CPU time (ms)"),
        ("infer_cpu_s", "inference, CPU time (ms)"),
    ):
        lines.append(_row(label, [_ms(result[key][n]) for n in names]))
    if result.get("memory"):
        memory = result["memory"]
        lines.append(_row("peak RSS growth (MiB)", [f"{memory[n]['peak_growth_mib']:.0f}" if n in memory else "-" for n in names]))
        if any("peak_gpu_mib" in m for m in memory.values()):
            lines.append(_row("peak GPU memory (MiB)", [f"{memory[n]['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in memory.get(n, {}) else "-" for n in names]))
            lines.append(_row("  growth over the model (MiB)", [f"{memory[n]['peak_gpu_growth_mib']:.0f}" if "peak_gpu_mib" in memory.get(n, {}) else "-" for n in names]))
    lines.append("")
    lines += [f"{label:40} {result[key]:.3f}" for key, label in RATIOS if key in result]

    split = result["split"]
    gpu = result["config"].get("device") == "cuda"
    kind = " (GPU time of each stage's kernels)" if gpu else ""
    lines += ["", f"our training step (ms){kind}:  " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in split["train_forward"].items())]
    lines.append(f"  backward {split['backward_s'] * 1000:.1f}, optimiser step {split['optimizer_s'] * 1000:.1f}")
    lines.append("our inference (ms):      " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in split["infer"].items()))
    iso = split["isolated"]
    if "outside_s" in split:  # older bench.json files have only the CPU-time figure
        lines.append(
            f"wall clock: trunk fwd+bwd {iso['trunk'] * 1000:.1f} ms, RoI head layers fwd+bwd {iso['roi_head_layers'] * 1000:.1f} ms: "
            f"outside them {split['outside_s'] * 1000:.1f} ms, {split['outside_share_wall']:.1%} of a training step"
        )
    lines.append(
        f"CPU time: trunk fwd+bwd {iso['trunk_cpu'] * 1000:.1f} ms, RoI head layers fwd+bwd {iso['roi_head_layers_cpu'] * 1000:.1f} ms, "
        f"optimiser step {split['forward_backward_optimizer_cpu_s'][2] * 1000:.1f} ms ({split['trunk_and_head_param_share']:.1%} of it theirs): "
        f"outside them {split['outside_cpu_s'] * 1000:.1f} ms, {split['outside_share']:.1%} of a training step"
    )
    twin = result["twin_inference_diff"]
    if twin["same_counts"]:
        lines.append(
            f"torchvision's twin at inference (fp32, our layout): proposals equal to {twin['proposals_px']:.1e} px, "
            f"detections to {twin['boxes_px']:.1e} px and {twin['scores']:.1e} in score, {twin['labels_differ']} labels differ"
        )
    else:
        lines.append("torchvision's twin at inference (fp32, our layout): different proposal or detection counts (see differences)")
    if "data" in result:
        d = result["data"]
        lines.append(f"data: {d['images_per_s']:.1f} images/s delivered, {d['train_steps_per_s']:.2f} steps/s trained (x{d['ratio']:.1f})")
    if "busy" in result:
        b = result["busy"]
        lines.append(
            f"busy machine (one competing process): threads={b['policy']} {b['busy']['step_s'] * 1000:.1f} ms with {b['busy']['threads']} thread(s) "
            f"against {b['idle']['step_s'] * 1000:.1f} ms idle with {b['idle']['threads']} (x{b['busy_ratio']:.2f}); all "
            f"{b['busy_all_threads']['threads']} threads {b['busy_all_threads']['step_s'] * 1000:.1f} ms (x{b['unmanaged_ratio']:.2f})"
        )
    m = result["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; load average (1, 5, 15 min) "
        f"{m['load_average_at_start']} at the start, {m['load_average']} at the end"
    )
    if "bf16_map" in result:
        fp32, bf16 = result["bf16_map"]["fp32"], result["bf16_map"]["bf16"]
        lines.append(
            f"bf16 autocast inference: val mAP {bf16['map']:.4f} vs fp32 {fp32['map']:.4f} "
            f"(change {bf16['map'] - fp32['map']:+.4f}), {fp32['seconds_per_image'] / bf16['seconds_per_image']:.2f}x the speed"
        )
    return "\n".join(lines)


def default_path(root: Path) -> Path:
    """``<root>/outputs/bench/<time>/bench.json``."""
    return root / "outputs" / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S") / "bench.json"


def write(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
