"""How far a run is from what this machine's arithmetic allows (``scripts/floor.py``).

Every training step and every validation image runs the network's dense layers: the trunk's
and the RPN head's convolutions and the RoI head's fully connected layers. No change to anchors,
samplers, NMS, pooling or the loop removes that arithmetic; only a smaller network, fewer or
smaller images, or cheaper arithmetic (bf16) does. This module measures it on the run's own
data, so that a speed target can be compared with its floor:

* on ``images`` real training batches (the run's DataModule: its augmentation, its multi-scale
  sizes, its mosaics) and as many validation images, after ``warmup`` more of each:

  * ``flops``: the FLOPs of the dense layers (``torch.utils.flop_counter.FlopCounterMode``:
    convolutions and matrix products, forward and backward) of a training step, and of a
    validation step (:meth:`FasterRCNN.trace` with both branches, as
    :meth:`FasterRCNNModule.validation_step` runs it);
  * ``dense_s``: those layers alone, timed on the same image: ``trunk`` and ``rpn_head``
    forward and backward, the RoI head's layers (``roi_head_layers``) forward and backward on
    as many RoIs as the step sampled; at validation forward only, on both branches' RoIs;
  * ``step_s``: the whole step, timed the same way (training: forward, backward and the run's
    own optimiser, :meth:`FasterRCNNModule.configure_optimizers`; validation: the trace);
    ``loader_s``: the training loader's time per batch (the first epoch's: files read);
  * ``dense_gflops``: ``flops / dense_s``, against ``gemm_gflops``, an fp32 matrix product's
    rate at the same thread count (what the BLAS reaches on its most favourable shape);
  * ``one_thread``: ``dense_s`` and ``step_s`` again with one thread. With one core taken by
    another process a step has one thread (``threads=auto``): ``one_core_ratio`` =
    one-thread step / step is the busy-machine ratio that policy reaches, and
    ``dense_speedup`` the two threads' gain on the dense layers alone;

* ``run``: the run's steps (``trainer.max_epochs`` x its training batches, or
  ``trainer.max_steps``) and validations (every ``check_val_every_n_epoch`` epochs and after
  the last) times those means: ``dense_floor_s`` (the dense layers alone, at the speed measured
  here) and ``projected_s`` (loader, steps and validation steps as measured here; start-up and
  logging not included).

Timings are wall-clock means; the machine's speed drifts, so each batch's step and dense
layers are timed back to back and only their ratios are firm.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from fasterrcnn.bench import harness, report
from fasterrcnn.bench.harness import Log
from fasterrcnn.build import CONF_DIR, build_datamodule, compose_config, model_config
from fasterrcnn.data import DetectionBatch
from fasterrcnn.lit import FasterRCNNModule, training_targets
from fasterrcnn.model import FasterRCNN
from fasterrcnn.threads import set_threads

T = TypeVar("T")


@dataclass
class FloorOptions:
    """``scripts/floor.py --help``."""

    images: int = 20
    warmup: int = 3
    threads: str = "auto"
    ckpt: str | None = None
    gemm_size: int = 2048
    seed: int = 0
    out: str | None = None


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dense_flops(fn: Callable[[], T]) -> tuple[float, T]:
    """FLOPs of the convolutions and matrix products (forward and backward) that ``fn`` runs,
    and what it returned."""
    with FlopCounterMode(display=False) as counter:
        value = fn()
    return float(counter.get_total_flops()), value


def gemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an fp32 ``(size, size) @ (size, size)`` product at torch's thread count (median
    of ``repeats`` after one warm-up)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / seconds / 1e9


def run_counts(cfg: DictConfig, train_batches: int) -> tuple[int, int]:
    """The training steps and validation loops of the run ``cfg`` describes, with
    ``train_batches`` batches an epoch: ``trainer.max_epochs`` epochs (or ``trainer.max_steps``
    when set and fewer), a validation every ``check_val_every_n_epoch`` epochs and one after the
    last step when that was not one (``fasterrcnn.training.train``)."""
    epochs = int(cfg.trainer.max_epochs)
    steps = epochs * train_batches
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    if 0 < max_steps < steps:
        steps, epochs = max_steps, max_steps // train_batches
    every = int(cfg.trainer.get("check_val_every_n_epoch") or 1)
    validations = epochs // every
    if steps % train_batches or epochs % every or validations == 0:
        validations += 1  # train() validates the final weights when the last step was not validated
    return steps, validations


def project_run(steps: int, validations: int, val_images: int, train: dict, val: dict) -> dict:
    """The whole run from the per-step means: ``dense_floor_s`` (dense layers only) and
    ``projected_s`` (loader, training steps and validation steps), both split into training and
    validation."""
    out = {"steps": steps, "validations": validations, "val_images": val_images}
    for key, train_s, val_s in (
        ("dense_floor", train["dense_s"], val["dense_s"]),
        ("projected", train["step_s"] + train["loader_s"], val["step_s"]),
    ):
        out[f"{key}_training_s"] = steps * train_s
        out[f"{key}_validation_s"] = validations * val_images * val_s
        out[f"{key}_s"] = out[f"{key}_training_s"] + out[f"{key}_validation_s"]
    return out


def _grads(*outputs: Tensor) -> None:
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


def dense_times(model: FasterRCNN, autocast: Callable, images: Tensor, num_rois: int, backward: bool) -> dict[str, float]:
    """Seconds of the detector's dense layers alone on one batch, each timed on its own: the
    trunk, the RPN head on the trunk's features, the RoI head's layers on ``num_rois`` pooled
    RoIs; forward, and backward when ``backward`` (the gradients a training step computes)."""
    head = model.roi_head
    if model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out: dict[str, float] = {}
    with torch.enable_grad() if backward else torch.no_grad():
        start = time.perf_counter()
        with autocast():
            features = model.trunk(images)
        if backward:
            _grads(features)
        out["trunk"] = time.perf_counter() - start
        features = features.detach().requires_grad_(backward)  # the RPN head's input, as in a step
        s = head.roi_size
        pooled = features.new_empty(num_rois, features.shape[1], s, s).normal_().float().requires_grad_(backward)

        def rpn_head() -> None:
            with autocast():
                logits, deltas = model.rpn(features)
            if backward:
                _grads(logits, deltas)

        def roi_head_layers() -> None:
            with autocast():
                x = head.head(pooled)
                logits, deltas = head.cls_score(x), head.bbox_pred(x)
            if backward:
                _grads(logits, deltas)

        out["rpn_head"], out["roi_head_layers"] = timed(rpn_head), timed(roi_head_layers)
    model.zero_grad(set_to_none=True)
    return out


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def _summary(rows: list[dict[str, float]], one_thread: list[dict[str, float]] | None) -> dict:
    """Means over the measured images, with the derived rates and shares."""
    out: dict = _mean(rows)
    out["images"] = len(rows)
    parts = ("trunk", "rpn_head", "roi_head_layers")
    out["dense_s"] = sum(out[p] for p in parts)
    out["dense_gflops"] = out["flops"] / out["dense_s"] / 1e9
    out["dense_share"] = out["dense_s"] / out["step_s"]  # of the step, the loader not included
    out["rpn_head_share"] = out["rpn_head"] / out["step_s"]
    if one_thread:
        single = _mean(one_thread)
        single["dense_s"] = sum(single[p] for p in parts)
        out["one_thread"] = single
        out["dense_speedup"] = single["dense_s"] / out["dense_s"]
        out["one_core_ratio"] = single["step_s"] / out["step_s"]
    return out


def _batches(loader, count: int) -> Iterator[tuple[DetectionBatch, float]]:
    """``count`` batches of ``loader`` with the seconds each took to load."""
    it = iter(loader)
    for _ in range(count):
        start = time.perf_counter()
        batch = next(it)
        yield batch, time.perf_counter() - start


def measure(module: FasterRCNNModule, cfg: DictConfig, dm, options: FloorOptions, threads: int, log: Log = print) -> dict:
    """The training and validation figures of the module docstring (``train``, ``validation``)."""
    model: FasterRCNN = module.model
    autocast = harness.autocast_factory(str(cfg.trainer.precision), torch.device("cpu"))
    optimizer = module.configure_optimizers()["optimizer"]
    counts = [threads, 1] if threads > 1 else [threads]

    def train_step(batch: DetectionBatch) -> int:
        """One training step as FasterRCNNModule runs it; returns the number of RoIs it sampled."""
        boxes, labels = training_targets(batch)
        with autocast():
            sampled = model.trace(batch.images, batch.image_sizes, batch.original_sizes, boxes, labels).training
        sampled.losses["loss"].backward()  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(sampled.rois.shape[0])  # type: ignore[union-attr]

    log(f"training: {options.warmup} + {options.images} batches of the run's loader ...")
    model.train()
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for i, (batch, loader_s) in enumerate(_batches(dm.train_dataloader(), options.warmup + options.images)):
        # counted once, untimed (it also lets oneDNN build its kernels for this image size)
        flops, num_rois = dense_flops(lambda: train_step(batch))  # noqa: B023 (called at once)
        for n in counts:
            torch.set_num_threads(n)
            row = {"step_s": timed(lambda: train_step(batch)), **dense_times(model, autocast, batch.images, num_rois, backward=True)}  # noqa: B023
            if i >= options.warmup:
                rows[n].append({**row, "flops": flops, "loader_s": loader_s})
        torch.set_num_threads(threads)

    log(f"validation: {options.warmup} + {options.images} images ...")
    model.eval()
    evaluator = module.evaluator
    val_rows: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for i, (batch, _) in enumerate(_batches(dm.val_dataloader(), options.warmup + options.images)):
        boxes, labels = training_targets(batch)

        def val_step(batch=batch, boxes=boxes, labels=labels):
            with torch.no_grad(), autocast():
                return model.trace(batch.images, batch.image_sizes, batch.original_sizes, boxes, labels, detect=True, num_proposals=evaluator.max_proposals)

        flops, trace = dense_flops(val_step)
        num_rois = int(trace.training.rois.shape[0] + trace.testing.rois.shape[0])  # type: ignore[union-attr]
        for n in counts:
            torch.set_num_threads(n)
            row = {"step_s": timed(val_step), **dense_times(model, autocast, batch.images, num_rois, backward=False)}
            if i >= options.warmup:
                val_rows[n].append({**row, "flops": flops, "rois": float(num_rois)})
        torch.set_num_threads(threads)
    one = threads > 1
    return {
        "train": _summary(rows[threads], rows[1] if one else None),
        "validation": _summary(val_rows[threads], val_rows[1] if one else None),
    }


def run(overrides: list[str], options: FloorOptions, log: Log = print) -> dict:
    """Measure as the module docstring says for the run ``overrides`` describe (untrained weights,
    or ``options.ckpt``'s), project it, print a table and write the JSON (``options.out``,
    default ``outputs/bench/<time>/floor.json``); returns what it wrote."""
    if options.images < 1 or options.warmup < 0:
        raise ValueError("floor: --images must be at least 1 and --warmup at least 0")
    before = torch.get_num_threads()
    try:
        threads = set_threads(options.threads)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config(list(overrides), output_dir=tmp, pretrained=False)
        torch.manual_seed(options.seed)
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        if options.ckpt:
            module = FasterRCNNModule.load(options.ckpt)
            module.optim = module.optim or OmegaConf.to_container(cfg.optim, resolve=True)
        else:
            module = FasterRCNNModule(
                model_config(cfg), optim=OmegaConf.to_container(cfg.optim, resolve=True), evaluation=OmegaConf.to_container(cfg.evaluation, resolve=True), pretrained=False
            )
        log(f"floor: {threads} thread(s), {harness.machine()}")
        gemm = {"threads": gemm_gflops(options.gemm_size)}
        if threads > 1:
            torch.set_num_threads(1)
            gemm["one_thread"] = gemm_gflops(options.gemm_size)
            torch.set_num_threads(threads)
        measured = measure(module, cfg, dm, options, threads, log)
        steps, validations = run_counts(cfg, len(dm.train_dataloader()))
        result = {
            "config": {"overrides": list(overrides), "ckpt": options.ckpt, "images": options.images, "warmup": options.warmup, "precision": str(cfg.trainer.precision)},
            "machine": harness.machine(),
            "threads": threads,
            "gemm_gflops": gemm,
            **measured,
            "run": project_run(steps, validations, len(dm.datasets["val"]), measured["train"], measured["validation"]),
        }
    finally:
        torch.set_num_threads(before)
    log("\n" + table(result))
    out = report.write(result, Path(options.out) if options.out else report.default_path(CONF_DIR.parent).with_name("floor.json"))
    log(f"\nwrote {out}")
    return result


def table(result: dict) -> str:
    """The floor's summary, in milliseconds per step or image and seconds per run."""
    lines = [f"{'':28}{'training step':>16}{'validation image':>18}"]
    train, val = result["train"], result["validation"]

    def row(label: str, key: str, scale: float = 1000.0, decimals: int = 1, suffix: str = "", sub: str | None = None) -> None:
        cells = []
        for part, width in ((train, 16), (val, 18)):
            value = (part.get(sub, {}) if sub else part).get(key)
            cells.append(f"{value * scale:{width - len(suffix)}.{decimals}f}{suffix}" if value is not None else f"{'-':>{width}}")
        lines.append(f"{label:28}" + "".join(cells))

    row("whole step (ms)", "step_s")
    row("loader (ms)", "loader_s")
    row("dense layers alone (ms)", "dense_s")
    row("  trunk", "trunk")
    row("  RPN head", "rpn_head")
    row("  RoI head layers", "roi_head_layers")
    row("dense GFLOP", "flops", 1e-9, 2)
    row("dense GFLOP/s", "dense_gflops", 1.0)
    row("dense share of the step", "dense_share", 100.0, suffix="%")
    row("RPN head's share", "rpn_head_share", 100.0, suffix="%")
    if "one_thread" in train:
        row("one thread: whole step (ms)", "step_s", sub="one_thread")
        row("one thread: dense (ms)", "dense_s", sub="one_thread")
        row("one-thread step / step", "one_core_ratio", 1.0, 2)
        row("dense layers' speed-up", "dense_speedup", 1.0, 2)
    gemm = result["gemm_gflops"]
    count = f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}"
    lines.append(f"fp32 GEMM GFLOP/s: {gemm['threads']:.0f} ({count})" + (f", {gemm['one_thread']:.0f} (1 thread)" if "one_thread" in gemm else ""))
    run = result["run"]
    lines.append(
        f"the run: {run['steps']} steps, {run['validations']} validation(s) of {run['val_images']} images: "
        f"dense layers alone {run['dense_floor_s']:.0f} s (training {run['dense_floor_training_s']:.0f}, validation "
        f"{run['dense_floor_validation_s']:.0f}); as measured here {run['projected_s']:.0f} s (training "
        f"{run['projected_training_s']:.0f}, validation {run['projected_validation_s']:.0f}), start-up not included"
    )
    return "\n".join(lines)


__all__ = ["FloorOptions", "dense_flops", "dense_times", "gemm_gflops", "measure", "project_run", "run", "run_counts", "table"]
