"""Speed of this project's Faster R-CNN against torchvision's ``FasterRCNN`` configured
identically (``scripts/bench.py``; every figure and how it is measured: ``docs/speed.md``).

Both detectors are built in one process from the composed config with untrained weights
(nothing is downloaded): torchvision's is :func:`~fasterrcnn.bench.twin.torchvision_twin`, with
deep copies of our layers, the same anchors (checked tensor for tensor), sampler and RoI
pooling. The same image (the first validation image, resized by the DataModule, or exactly
``image_size``) and ground truth go to both.

What is measured, each after ``warmup`` runs, as the median of ``repeats`` runs, with the
contenders interleaved (:func:`~fasterrcnn.bench.harness.run_interleaved`):

* ``train_s``, ``infer_s`` (and ``*_cpu_s`` in CPU time, ``*_runs_s`` every run): the training
  step (forward, backward, SGD step) and inference per image of ``ours``, ``torchvision`` and,
  when our memory-format, precision or compile settings are not the defaults, ``torchvision_same``
  (torchvision with those settings); ``*_ratio`` = ours / torchvision of those medians;
* ``split``: our time split (:func:`~fasterrcnn.bench.stages.time_split`): each forward stage
  from one profiled step, backward and the optimiser step, the trunk and the RoI head's layers
  alone, and the share of a step outside them;
* ``anchor_max_abs_diff_px`` and ``twin_inference_diff``: how far torchvision's anchors and
  test-time proposals and detections (fp32, our memory layout) are from ours;
* ``memory``: the peak RSS growth of each contender in a child process of its own;
* ``data``: images per second the training loader delivers against our training steps per second;
* ``bf16_map`` (with ``map_ckpt``): a trained checkpoint's validation mAP in fp32 and bf16;
* ``busy`` (with ``busy_steps``): our training step idle and beside a competing CPU-bound
  process, under ``threads=auto`` and with torch's default count
  (:func:`~fasterrcnn.bench.busy.busy_machine`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from fasterrcnn.bench import harness, report
from fasterrcnn.bench.harness import Contender, Log, median
from fasterrcnn.bench.stages import time_split
from fasterrcnn.bench.twin import DIFFERENCES, check_anchors, inference_difference, torchvision_twin
from fasterrcnn.build import CONF_DIR


@dataclass
class SpeedOptions:
    """The bench's options (``scripts/bench.py --help``)."""

    repeats: int = 5
    warmup: int = 1
    image_size: list[int] | None = None
    profile_steps: int = 1
    data_images: int = 30
    no_memory: bool = False
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    out: str | None = None
    map_ckpt: str | None = None
    busy_steps: int = 0


def run(overrides: list[str], options: SpeedOptions, log: Log = print) -> dict:
    """Build both detectors, time them and write the JSON (``options.out``, default
    ``outputs/bench/<time>/bench.json``); returns what it wrote."""
    if options.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if options.threads:
        torch.set_num_threads(options.threads)
    cfg, model, batch = harness.setup(overrides, options.seed, options.device, options.image_size)
    device = batch.images.device
    sync = harness.synchronizer(device)
    settings = {"channels_last": bool(model.channels_last), "precision": str(cfg.trainer.precision)}
    if model.compiled:
        settings["compile"] = True  # model.compile=true: torch.compile of the trunk and heads
    if device.type == "cuda":
        settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)  # harness.setup: trainer.benchmark
    autocast = harness.autocast_factory(settings["precision"], device)
    contenders = [
        Contender("ours", model, "ours", batch, autocast, sync),
        Contender("torchvision", torchvision_twin(model).to(device), "torchvision", batch, sync=sync),
    ]
    if settings["channels_last"] or model.compiled or settings["precision"] not in harness.DEFAULT_PRECISIONS:
        same = torchvision_twin(model, channels_last=settings["channels_last"], compiled=model.compiled).to(device)
        contenders.append(Contender("torchvision_same", same, "torchvision", batch, autocast, sync))  # torchvision, our settings
        del same
    anchor_diff = check_anchors(model, contenders[1].model, batch.images)
    h, w = batch.image_sizes[0]
    start_load = harness.machine()["load_average"]
    log(
        f"bench: {cfg.backbone._target_.rsplit('.', 1)[-1]} at {h}x{w}, anchors {len(model.anchor_generator.base)}/location "
        f"(torchvision's equal to {anchor_diff:.1e} px), settings {settings}, {harness.machine()}"
    )
    log(f"timing {options.warmup} warm-up + {options.repeats} runs, interleaved:")
    harness.run_interleaved(contenders, options.warmup, options.repeats, log)
    # Each contender trained its own weights: a fresh twin of ours (in our memory layout) to compare.
    twin_diff = inference_difference(model, torchvision_twin(model, channels_last=settings["channels_last"]).to(device), batch.images)

    names = [c.name for c in contenders]
    result: dict = {
        "config": {"overrides": overrides, "image_size": [h, w], "settings": settings, "repeats": options.repeats, "warmup": options.warmup, "device": device.type},
        "machine": {**harness.machine(), "load_average_at_start": start_load},
        "anchor_max_abs_diff_px": anchor_diff,
        "twin_inference_diff": twin_diff,
        "differences": DIFFERENCES,
    }
    for key in ("train", "infer", "train_cpu", "infer_cpu"):
        result[f"{key}_s"] = {c.name: median(c.runs()[key]) for c in contenders}
        result[f"{key}_runs_s"] = {c.name: c.runs()[key] for c in contenders}
    for key in ("train", "infer", "train_cpu", "infer_cpu"):
        result[f"{key}_ratio"] = result[f"{key}_s"]["ours"] / result[f"{key}_s"]["torchvision"]
    if "torchvision_same" in names:
        for key in ("train", "infer"):
            result[f"{key}_ratio_same_settings"] = result[f"{key}_s"]["ours"] / result[f"{key}_s"]["torchvision_same"]

    if options.busy_steps > 0:
        from fasterrcnn.bench.busy import busy_machine

        log(f"a busy machine: {options.busy_steps} training steps idle, then beside a CPU-bound process (threads=auto, then all threads) ...")
        result["busy"] = busy_machine(contenders[0], options.busy_steps, options.warmup, log=log)
    log("profiling our stages ...")
    result["split"] = time_split(contenders[0], batch, options.profile_steps, options.repeats)
    if options.data_images > 0:
        log("timing the DataLoader ...")
        images_per_s = harness.data_throughput(cfg, options.data_images)
        steps_per_s = 1.0 / result["train_s"]["ours"]
        result["data"] = {
            "images_per_s": images_per_s,
            "train_steps_per_s": steps_per_s,
            "ratio": images_per_s / (steps_per_s * len(batch)),
            "num_workers": int(cfg.data.num_workers),
        }
    if not options.no_memory:
        del contenders  # the parent's twins, before the children build theirs
        gc.collect()
        log("peak memory, one child process each ...")
        result["memory"] = harness.measure_memory(names, overrides, options.seed, options.device, options.threads, options.image_size, log)
    if options.map_ckpt:
        from fasterrcnn.bench.accuracy import precision_map

        log(f"validation mAP of {options.map_ckpt}, fp32 and bf16 autocast ...")
        result["bf16_map"] = precision_map(cfg, options.map_ckpt, options.device, log)

    result["machine"]["load_average"] = harness.machine()["load_average"]
    log("\n" + report.table(result))
    out = report.write(result, Path(options.out) if options.out else report.default_path(CONF_DIR.parent))
    log(f"\nwrote {out}")
    return result
