"""Speed of this project's Faster R-CNN against torchvision's ``FasterRCNN`` configured identically.

    python scripts/bench.py --threads 1                       # the CPU default (tiny backbone, 256-400 px)
    python scripts/bench.py --threads 1 '~experiment' backbone=vgg16 data.min_size=600 data.max_size=1000 \
        --image-size 600 1000 --repeats 3                     # VGG16 with the paper's anchors and sampler
    python scripts/bench.py --threads 1 trainer.precision=bf16-mixed model.channels_last=false

``'~experiment'`` drops the CPU default's experiment (small anchors, the fast sampler), leaving
the paper's groups. On a machine shared with other processes use ``--threads 1``: OpenMP threads
waiting for each other at every operator made steps 20x slower there.

Arguments that are not options below are Hydra overrides of ``conf/train.yaml``. Both detectors
are built in one process from the composed config with untrained weights (nothing is
downloaded): torchvision's gets deep copies of our trunk, RPN head and RoI head (fc layers,
classifier, regressor), the same anchor boxes (checked tensor for tensor), the config's sampler
counts and thresholds, the same RoI pooling (``roi_pool`` 7x7 or ``roi_align``) and an identity
transform in place of its resizing and normalisation (the DataModule did both already). The same
image (the first validation image, resized by the DataModule, or exactly ``--image-size``) and
ground truth go to both.

What is measured, each after ``--warmup`` runs, as the median of ``--repeats`` runs, with the
contenders interleaved (their order alternating) so that drift and other processes hit all:

* training step: forward, backward and an SGD step (lr 1e-3, momentum 0.9, wd 5e-4, all
  trainable parameters), for ours, torchvision's, and torchvision's with our memory-format and
  precision settings (only when those differ from the defaults);
* inference per image (testing proposal counts, e.g. 6000 -> 300);
* our time split: one extra profiled step (``torch.profiler``, with the ``record_function``
  scopes of :mod:`fasterrcnn.model`) gives each forward stage; backward and the optimiser step
  are timed directly; the trunk and the RoI head's layers are also timed alone (forward and
  backward) to tell what share of a step lies outside them;
* peak memory: each detector in a child process of its own; the growth of the resident set
  (Linux ``VmHWM``, reset after building) over two training steps and an inference;
* data loading: images per second the DataModule's training loader delivers against the
  training steps per second of our detector.

Prints a table and writes everything to ``--out`` (default ``outputs/bench/<time>/bench.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import (
    AnchorGenerator as TVAnchorGenerator,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align, roi_pool

from fasterrcnn import build
from fasterrcnn.build import build_datamodule, build_model, model_config
from fasterrcnn.cli import parse_script_args
from fasterrcnn.data import DetectionBatch, collate
from fasterrcnn.lit import training_targets
from fasterrcnn.model import FasterRCNN

ROOT = Path(__file__).resolve().parents[1]

# The record_function scopes of fasterrcnn.model, in the order they run.
TRAIN_STAGES = (
    "backbone",
    "rpn_head",
    "anchors",
    "anchor_target_creator",
    "proposal_creator",
    "proposal_target_creator",
    "roi_pool",
    "roi_head_layers",
    "losses",
)
INFER_STAGES = (
    "backbone",
    "rpn_head",
    "anchors",
    "proposal_creator",
    "roi_pool",
    "roi_head_layers",
    "postprocess",
)

# What still differs between the two once configured identically (torchvision hard-codes these).
DIFFERENCES = [
    "torchvision labels every anchor for the RPN; ours (the paper) ignores anchors crossing the image border",
    "torchvision keeps the top pre-NMS proposals before dropping small boxes; ours drops small boxes first",
    "torchvision's RoI box loss is smooth L1 with beta 1/9; ours uses the config's roi_sigma (1: beta 1)",
    (
        "torchvision's RPN objectness is one logit per anchor: it gets our 2-way scores as a logit difference "
        "(sigmoid(l1 - l0) = softmax(l0, l1)[1]), so the layers and weights are ours"
    ),
]


# ---------------------------------------------------------------------------- torchvision, configured as ours
class IdentityTransform(nn.Module):
    """GeneralizedRCNNTransform without resizing or normalising: the images arrive as ours do."""

    def forward(self, images: list[Tensor], targets=None):
        tensors = images[0][None] if len(images) == 1 else torch.stack(images)
        return ImageList(tensors, [tuple(img.shape[-2:]) for img in images]), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


class Trunk(nn.Module):
    """Our trunk as torchvision's backbone (``out_channels``), optionally channels-last."""

    def __init__(self, trunk: nn.Module, out_channels: int, channels_last: bool) -> None:
        super().__init__()
        self.body = trunk
        self.out_channels = out_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)


class SoftmaxRPNHead(nn.Module):
    """Our RPN head's layers behind torchvision's RPNHead interface: objectness ``(N, k, H, W)``
    as the logit difference of our 2-way scores, deltas ``(N, 4k, H, W)`` (same channel order)."""

    def __init__(self, rpn: nn.Module) -> None:
        super().__init__()
        self.conv, self.score, self.loc = (
            copy.deepcopy(rpn.conv),
            copy.deepcopy(rpn.score),
            copy.deepcopy(rpn.loc),
        )

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for x in features:
            h = torch.relu(self.conv(x))
            s = self.score(h)  # (N, 2k, H, W), channel 2a + c
            objectness.append(s[:, 1::2] - s[:, 0::2])
            deltas.append(self.loc(h))
        return objectness, deltas


class FixedStrideAnchorGenerator(TVAnchorGenerator):
    """torchvision's anchor generator with our base anchors and stride: its ``grid_anchors``
    places cell anchors at ``j * stride``, ours at ``(j + 0.5) * stride``, so the cell anchors
    are shifted by half a stride; the stride is fixed instead of ``image_size // feature_size``
    (which is 15, not 16, for a 300 px image and a 19-cell feature map)."""

    def __init__(self, base: Tensor, stride: int) -> None:
        super().__init__(sizes=((1,),), aspect_ratios=((1.0,),))
        self.cell_anchors = [base.clone() + stride / 2]
        self.stride = stride

    def num_anchors_per_location(self) -> list[int]:
        return [self.cell_anchors[0].shape[0]]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        device = feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)
        stride = torch.tensor(self.stride, dtype=torch.int64, device=device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, [[stride, stride]] * len(grid_sizes)))
        return [anchors for _ in image_list.image_sizes]


class RoIPooler(nn.Module):
    """Our RoI pooling behind torchvision's ``box_roi_pool`` interface (one feature map)."""

    def __init__(self, roi_head: nn.Module) -> None:
        super().__init__()
        self.pooling, self.size, self.scale = (
            roi_head.pooling,
            roi_head.roi_size,
            roi_head.spatial_scale,
        )
        self.sampling_ratio, self.aligned = roi_head.sampling_ratio, roi_head.aligned

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes) -> Tensor:
        x = features["0"]
        if x.dtype in (torch.float16, torch.bfloat16):
            # as ours: torchvision's CPU RoI kernels take no bf16 (and under autocast its RPN
            # hands over bf16 proposals, which its own MultiScaleRoIAlign would reject too)
            x = x.float()
            proposals = [p.float() for p in proposals]
        if self.pooling == "roi_pool":
            return roi_pool(x, proposals, self.size, self.scale)
        return roi_align(x, proposals, self.size, self.scale, self.sampling_ratio, self.aligned)


def torchvision_twin(model: FasterRCNN, channels_last: bool = False) -> TVFasterRCNN:
    """torchvision's FasterRCNN with ``model``'s weights, anchors, sampler and thresholds."""
    pc, atc, ptc = (
        model.proposal_creator,
        model.anchor_target_creator,
        model.proposal_target_creator,
    )
    if ptc.neg_iou_thresh_lo != 0.0:
        raise ValueError(
            f"torchvision's RoI sampler has no lower background threshold; sampler.proposal_target.neg_iou_thresh_lo={ptc.neg_iou_thresh_lo} cannot be matched"
        )
    head = model.roi_head
    predictor = FastRCNNPredictor(head.cls_score.in_features, model.num_classes + 1)
    predictor.cls_score.load_state_dict(head.cls_score.state_dict())
    predictor.bbox_pred.load_state_dict(head.bbox_pred.state_dict())
    tv = TVFasterRCNN(
        Trunk(copy.deepcopy(model.trunk), model.rpn.conv.in_channels, channels_last),
        num_classes=None,
        min_size=1,
        max_size=1,
        image_mean=[0.0] * 3,
        image_std=[1.0] * 3,
        rpn_anchor_generator=FixedStrideAnchorGenerator(model.anchor_generator.base, model.anchor_generator.stride),
        rpn_head=SoftmaxRPNHead(model.rpn),
        rpn_pre_nms_top_n_train=pc.n_pre_nms["training"],
        rpn_pre_nms_top_n_test=pc.n_pre_nms["testing"],
        rpn_post_nms_top_n_train=pc.n_post_nms["training"],
        rpn_post_nms_top_n_test=pc.n_post_nms["testing"],
        rpn_nms_thresh=pc.nms_thresh,
        rpn_fg_iou_thresh=atc.pos_iou_thresh,
        rpn_bg_iou_thresh=atc.neg_iou_thresh,
        rpn_batch_size_per_image=atc.n_sample,
        rpn_positive_fraction=atc.pos_ratio,
        box_head=copy.deepcopy(head.head),
        box_predictor=predictor,
        box_score_thresh=model.score_thresh,
        box_nms_thresh=model.nms_thresh,
        box_detections_per_img=model.max_detections or 1_000_000,
        box_fg_iou_thresh=ptc.pos_iou_thresh,
        box_bg_iou_thresh=ptc.neg_iou_thresh_hi,
        box_batch_size_per_image=ptc.n_sample,
        box_positive_fraction=ptc.pos_ratio,
        bbox_reg_weights=tuple(1.0 / s for s in model.roi_box_coder.std),
    )
    tv.transform = IdentityTransform()
    tv.roi_heads.box_roi_pool = RoIPooler(head)  # the constructor accepts only MultiScaleRoIAlign
    tv.rpn.min_size = pc.min_size  # torchvision hard-codes 1e-3; the bench feeds original-size images
    tv.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return tv


def check_anchors(model: FasterRCNN, tv: TVFasterRCNN, images: Tensor) -> float:
    """Largest difference between our anchors and torchvision's for ``images``; raises above 1e-3 px."""
    with torch.no_grad():
        features = model.trunk(images)
    ours = model.anchor_generator(features.shape[-2], features.shape[-1])
    theirs = tv.rpn.anchor_generator(ImageList(images, [tuple(images.shape[-2:])]), [features])[0]
    if ours.shape != theirs.shape:
        raise RuntimeError(f"anchor counts differ: ours {tuple(ours.shape)}, torchvision {tuple(theirs.shape)}")
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"torchvision's anchors differ from ours by up to {diff:.4f} px")
    return diff


# ---------------------------------------------------------------------------- contenders
class Contender:
    """One detector with its optimiser: ``train_step()`` returns (forward, backward, step) seconds.

    Each run also records the CPU time of the process (``time.process_time``, all threads): with
    other processes on the machine, wall-clock time counts their time slices too, CPU time
    does not (it does count OpenMP threads spinning at barriers, so it is cleanest with
    ``--threads 1``).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        kind: str,
        batch: DetectionBatch,
        autocast: Callable,
        sync: Callable,
    ) -> None:
        self.name, self.model, self.kind = name, model, kind
        self.autocast, self.sync = autocast, sync
        self.images, self.sizes = batch.images, batch.image_sizes
        self.boxes, self.labels = training_targets(batch)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, foreach=True)
        self.train_times: list[tuple[float, float, float]] = []
        self.infer_times: list[float] = []
        self.train_cpu: list[float] = []
        self.train_cpu_split: list[tuple[float, float, float]] = []
        self.infer_cpu: list[float] = []
        self.last_cpu = 0.0

    def loss(self) -> Tensor:
        if self.kind == "ours":
            return self.model.losses(self.images, self.sizes, self.sizes, self.boxes, self.labels)["loss"]
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels)]
        return sum(self.model(list(self.images), targets).values())

    def detect(self) -> list[dict[str, Tensor]]:
        if self.kind == "ours":
            return self.model.predict(self.images, self.sizes, self.sizes)
        return self.model(list(self.images))

    def train_step(self) -> tuple[float, float, float]:
        self.model.train()
        self.sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss()
        self.sync()
        t1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        self.sync()
        t2, c2 = time.perf_counter(), time.process_time()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        t3, c3 = time.perf_counter(), time.process_time()
        self.last_cpu = c3 - c0
        self.last_cpu_split = (c1 - c0, c2 - c1, c3 - c2)
        return t1 - t0, t2 - t1, t3 - t2

    def infer(self) -> float:
        self.model.eval()
        self.sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        with torch.no_grad(), self.autocast():
            self.detect()
        self.sync()
        self.last_cpu = (time.process_time() - c0) / len(self.sizes)
        return (time.perf_counter() - t0) / len(self.sizes)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_interleaved(contenders: list[Contender], warmup: int, repeats: int, log: Callable) -> None:
    """Training steps, then inference, round by round; the order alternates every round."""
    for r in range(warmup + repeats):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            t = c.train_step()
            if r >= warmup:
                c.train_times.append(t)
                c.train_cpu.append(c.last_cpu)
                c.train_cpu_split.append(c.last_cpu_split)
        for c in order:
            t = c.infer()
            if r >= warmup:
                c.infer_times.append(t)
                c.infer_cpu.append(c.last_cpu)
        label = "warm-up" if r < warmup else f"run {r - warmup + 1}/{repeats}"
        log(f"  {label}: " + ", ".join(f"{c.name} train {sum(c.train_times[-1]) if r >= warmup else float('nan'):.3f}s" for c in contenders))


# ---------------------------------------------------------------------------- our time split
def profile_stages(c: Contender, steps: int) -> dict[str, dict[str, float]]:
    """Seconds per step in each ``record_function`` scope of our model, training and inference."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for mode, stages, fn in (
        ("train", TRAIN_STAGES, c.train_step),
        ("infer", INFER_STAGES, c.infer),
    ):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
        out[mode] = {s: totals.get(s, 0.0) / 1e6 / steps for s in stages}
    return out


def isolated_layers(
    model: FasterRCNN,
    batch: DetectionBatch,
    num_rois: int,
    repeats: int,
    autocast: Callable,
    sync: Callable,
) -> dict[str, float]:
    """Median forward + backward seconds of the trunk alone and of the RoI head's layers alone
    (on ``num_rois`` pooled RoIs), as they run inside a training step: wall-clock and CPU time."""
    model.train()
    images = batch.images.contiguous(memory_format=torch.channels_last) if model.channels_last else batch.images
    head = model.roi_head
    c, s = model.rpn.conv.in_channels, head.roi_size
    pooled = torch.randn(num_rois, c, s, s, device=images.device)

    def trunk():
        with autocast():
            out = model.trunk(images)
        out.backward(torch.ones_like(out))

    def head_layers():
        with autocast():
            x = head.head(pooled)
            out = head.cls_score(x).float().sum() + head.bbox_pred(x).float().sum()
        out.backward()

    result = {}
    for name, fn in (("trunk", trunk), ("roi_head_layers", head_layers)):
        times, cpu = [], []
        for r in range(repeats + 1):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            if r:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            model.zero_grad(set_to_none=True)
        result[name] = median(times)
        result[name + "_cpu"] = median(cpu)
    return result


# ---------------------------------------------------------------------------- memory (child processes)
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args: argparse.Namespace, overrides: list[str]) -> None:
    """In a fresh process: build one contender, reset the peak RSS, run two training steps and an
    inference, print the growth of the peak over the post-build RSS as JSON."""
    cfg, model, batch = setup(overrides, args)
    tv = (
        torchvision_twin(
            model,
            channels_last=args.memory_child == "torchvision_same" and model.channels_last,
        )
        if args.memory_child != "ours"
        else None
    )
    use_ours_settings = args.memory_child in ("ours", "torchvision_same")
    target = model if tv is None else tv
    if tv is not None:
        del model
    gc.collect()
    autocast = autocast_factory(cfg, batch.images.device) if use_ours_settings else contextlib.nullcontext
    c = Contender(
        args.memory_child,
        target,
        "ours" if tv is None else "torchvision",
        batch,
        autocast,
        lambda: None,
    )
    base = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        reset = True
    except OSError:
        reset = False
    c.train_step()
    c.train_step()  # the optimiser's state exists from the second step on
    c.infer()
    peak = _rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "rss_after_build_mib": base / 1024,
                "peak_rss_mib": peak / 1024,
                "peak_growth_mib": (peak - base) / 1024,
                "peak_reset": reset,
            }
        )
    )


def measure_memory(args: argparse.Namespace, overrides: list[str], names: list[str], log: Callable) -> dict[str, dict]:
    result = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            *overrides,
            "--memory-child",
            name,
            "--seed",
            str(args.seed),
            "--device",
            args.device,
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.image_size:
            cmd += ["--image-size", *map(str, args.image_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd(), check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement of {name} failed:\n{proc.stderr[-2000:]}")
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {name}: peak RSS {result[name]['peak_rss_mib']:.0f} MiB (+{result[name]['peak_growth_mib']:.0f} MiB over the built model)")
    return result


# ---------------------------------------------------------------------------- data loading
def data_throughput(cfg: DictConfig, num_images: int) -> float:
    """Images per second the training DataLoader delivers (after its first batch)."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch)
        if n >= num_images:
            break
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------- bf16: accuracy
def precision_map(cfg: DictConfig, ckpt_path: str, log: Callable) -> dict[str, dict[str, float]]:
    """Validation mAP (VOC07 11-point) and seconds per image of a trained checkpoint, in fp32
    and under bf16 autocast, on the config's validation split."""
    from fasterrcnn.evaluation.voc import VOCEvaluator
    from fasterrcnn.lit import FasterRCNNModule

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--map-ckpt {ckpt_path}: no such file")
    model = FasterRCNNModule.load(ckpt_path).model.eval()
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    out = {}
    for name, ctx in (
        ("fp32", contextlib.nullcontext),
        ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ):
        evaluator = VOCEvaluator(list(cfg.data.classes))
        seconds, n = 0.0, 0
        for batch in dm.val_dataloader():
            t0 = time.perf_counter()
            with torch.no_grad(), ctx():
                dets = model.predict(batch.images, batch.image_sizes, batch.original_sizes)
            seconds += time.perf_counter() - t0
            n += len(batch)
            for det, boxes, labels, difficult in zip(dets, batch.original_boxes, batch.labels, batch.difficult):
                evaluator.update(det["boxes"], det["scores"], det["labels"], boxes, labels, difficult)
        out[name] = {
            "map": float(evaluator.compute(use_07_metric=True)["map"]),
            "seconds_per_image": seconds / max(n, 1),
            "images": n,
        }
        log(f"  {name}: val mAP {out[name]['map']:.4f}, {1000 * out[name]['seconds_per_image']:.1f} ms/image over {n} images")
    return out


# ---------------------------------------------------------------------------- setup
def autocast_factory(cfg: DictConfig, device: torch.device) -> Callable:
    """A context factory for the config's ``trainer.precision``: bf16/16 mixed -> autocast."""
    precision = str(cfg.trainer.precision)
    if precision.startswith("bf16"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    if precision not in ("32", "32-true"):
        raise ValueError(f"trainer.precision={precision!r}: the bench knows 32-true, bf16-mixed and 16-mixed")
    return contextlib.nullcontext


def load_batch(cfg: DictConfig, image_size: list[int] | None) -> DetectionBatch:
    """The first validation image as a batch of one; with ``image_size`` resized to exactly that,
    and its boxes with it. The original size is the input size: nothing is resized back."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    item = dm.datasets["val"][0]
    if image_size:
        h, w = item["image"].shape[-2:]
        item["image"] = F.interpolate(
            item["image"][None],
            size=tuple(image_size),
            mode="bilinear",
            align_corners=False,
        )[0]
        item["boxes"] = item["boxes"] * torch.tensor([image_size[1] / w, image_size[0] / h] * 2)
    item["original_size"] = tuple(item["image"].shape[-2:])
    return collate([item])


def setup(overrides: list[str], args: argparse.Namespace) -> tuple[DictConfig, FasterRCNN, DetectionBatch]:
    cfg = build.compose_config(overrides, output_dir=ROOT / "outputs" / "bench", pretrained=False)
    torch.manual_seed(args.seed)
    model = build_model(model_config(cfg), pretrained=False)
    device = torch.device(args.device)
    batch = load_batch(cfg, args.image_size).to(device)
    return cfg, model.to(device), batch


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": load,
    }


# ---------------------------------------------------------------------------- report
def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def table(result: dict) -> str:
    names = list(result["train_s"])
    lines = [f"{'':34}" + "".join(f"{n:>22}" for n in names)]
    lines.append(f"{'training step (ms, median)':34}" + "".join(f"{fmt_ms(result['train_s'][n]):>22}" for n in names))
    lines.append(f"{'inference per image (ms, median)':34}" + "".join(f"{fmt_ms(result['infer_s'][n]):>22}" for n in names))
    lines.append(f"{'training step, CPU time (ms)':34}" + "".join(f"{fmt_ms(result['train_cpu_s'][n]):>22}" for n in names))
    lines.append(f"{'inference, CPU time (ms)':34}" + "".join(f"{fmt_ms(result['infer_cpu_s'][n]):>22}" for n in names))
    if result.get("memory"):
        lines.append(
            f"{'peak RSS growth (MiB)':34}"
            + "".join(f"{result['memory'][n]['peak_growth_mib']:>22.0f}" if n in result["memory"] else f"{'-':>22}" for n in names)
        )
    out = ["\n".join(lines), ""]
    for key, label in (
        ("train_ratio", "training step ours / torchvision"),
        ("infer_ratio", "inference ours / torchvision"),
        ("train_cpu_ratio", "  the same in CPU time: training"),
        ("infer_cpu_ratio", "  the same in CPU time: inference"),
    ):
        out.append(f"{label:40} {result[key]:.3f}")
    for key, label in (
        ("train_ratio_same_settings", "training ours / torchvision, our settings"),
        ("infer_ratio_same_settings", "inference ours / torchvision, our settings"),
    ):
        if key in result:
            out.append(f"{label:40} {result[key]:.3f}")
    split = result["split"]
    out += [
        "",
        "our training step (ms):  " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in split["train_forward"].items()),
    ]
    out.append(f"  backward {split['backward_s'] * 1000:.1f}, optimiser step {split['optimizer_s'] * 1000:.1f}")
    out.append("our inference (ms):      " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in split["infer"].items()))
    iso = split["isolated"]
    out.append(
        f"CPU time: trunk fwd+bwd {iso['trunk_cpu'] * 1000:.1f} ms, RoI head layers fwd+bwd {iso['roi_head_layers_cpu'] * 1000:.1f} ms, "
        f"optimiser step {split['forward_backward_optimizer_cpu_s'][2] * 1000:.1f} ms ({split['trunk_and_head_param_share']:.1%} of it theirs): "
        f"outside them {split['outside_cpu_s'] * 1000:.1f} ms, {split['outside_share']:.1%} of a training step"
    )
    if "data" in result:
        d = result["data"]
        out.append(f"data: {d['images_per_s']:.1f} images/s delivered, {d['train_steps_per_s']:.2f} steps/s trained (x{d['ratio']:.1f})")
    m = result["machine"]
    out.append(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; load average (1, 5, 15 min) {m['load_average_at_start']} at the start, {m['load_average']} at the end"
    )
    if "bf16_map" in result:
        m = result["bf16_map"]
        out.append(
            f"bf16 autocast inference: val mAP {m['bf16']['map']:.4f} vs fp32 {m['fp32']['map']:.4f} "
            f"(change {m['bf16']['map'] - m['fp32']['map']:+.4f}), {m['fp32']['seconds_per_image'] / m['bf16']['seconds_per_image']:.2f}x the speed"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--repeats", type=int, default=5, help="measured runs per contender (median)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="resize the bench image to exactly H x W",
    )
    p.add_argument("--profile-steps", type=int, default=1, help="profiled steps for our time split")
    p.add_argument(
        "--data-images",
        type=int,
        default=30,
        help="images read to time the DataLoader (0: skip)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: torch's, one per core)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the JSON file (default outputs/bench/<time>/bench.json)")
    p.add_argument(
        "--map-ckpt",
        help="also: validation mAP of this trained checkpoint in fp32 and under bf16 autocast",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args, overrides = parse_script_args(p, argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.map_ckpt and not os.path.isfile(args.map_ckpt):
        p.error(f"--map-ckpt {args.map_ckpt}: no such file")
    return args, overrides


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args, overrides)
        return {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    cfg, model, batch = setup(overrides, args)
    device = batch.images.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = autocast_factory(cfg, device)
    settings = {
        "channels_last": bool(model.channels_last),
        "precision": str(cfg.trainer.precision),
    }
    tv = torchvision_twin(model).to(device)
    anchor_diff = check_anchors(model, tv, batch.images)
    h, w = batch.image_sizes[0]
    start_load = machine()["load_average"]
    log(
        f"bench: {cfg.backbone._target_.rsplit('.', 1)[-1]} at {h}x{w}, anchors {len(model.anchor_generator.base)}/location "
        f"(torchvision's equal to {anchor_diff:.1e} px), settings {settings}, {machine()}"
    )

    contenders = [
        Contender("ours", model, "ours", batch, autocast, sync),
        Contender("torchvision", tv, "torchvision", batch, contextlib.nullcontext, sync),
    ]
    non_default = settings["channels_last"] or settings["precision"] not in (
        "32",
        "32-true",
    )
    if non_default:
        tv_same = torchvision_twin(model, channels_last=settings["channels_last"]).to(device)
        contenders.append(Contender("torchvision_same", tv_same, "torchvision", batch, autocast, sync))
    log(f"timing {args.warmup} warm-up + {args.repeats} runs, interleaved:")
    run_interleaved(contenders, args.warmup, args.repeats, log)

    train_s = {c.name: median([sum(t) for t in c.train_times]) for c in contenders}
    infer_s = {c.name: median(c.infer_times) for c in contenders}
    result: dict = {
        "config": {
            "overrides": overrides,
            "image_size": [h, w],
            "settings": settings,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "machine": {**machine(), "load_average_at_start": start_load},
        "anchor_max_abs_diff_px": anchor_diff,
        "differences": DIFFERENCES,
        "train_s": train_s,
        "infer_s": infer_s,
        "train_runs_s": {c.name: [sum(t) for t in c.train_times] for c in contenders},
        "infer_runs_s": {c.name: c.infer_times for c in contenders},
        "train_ratio": train_s["ours"] / train_s["torchvision"],
        "infer_ratio": infer_s["ours"] / infer_s["torchvision"],
        "train_cpu_s": {c.name: median(c.train_cpu) for c in contenders},
        "infer_cpu_s": {c.name: median(c.infer_cpu) for c in contenders},
        "train_cpu_runs_s": {c.name: c.train_cpu for c in contenders},
        "infer_cpu_runs_s": {c.name: c.infer_cpu for c in contenders},
    }
    result["train_cpu_ratio"] = result["train_cpu_s"]["ours"] / result["train_cpu_s"]["torchvision"]
    result["infer_cpu_ratio"] = result["infer_cpu_s"]["ours"] / result["infer_cpu_s"]["torchvision"]
    if non_default:
        result["train_ratio_same_settings"] = train_s["ours"] / train_s["torchvision_same"]
        result["infer_ratio_same_settings"] = infer_s["ours"] / infer_s["torchvision_same"]

    log("profiling our stages ...")
    ours = contenders[0]
    stages = profile_stages(ours, args.profile_steps)
    isolated = isolated_layers(
        model,
        batch,
        model.proposal_target_creator.n_sample * len(batch),
        args.repeats,
        autocast,
        sync,
    )
    backward_s = median([t[1] for t in ours.train_times])
    optimizer_s = median([t[2] for t in ours.train_times])
    optimizer_cpu = median([t[2] for t in ours.train_cpu_split])
    # The optimiser step's share of the trunk and head: by their share of the trained parameters.
    trained = [p for p in model.parameters() if p.requires_grad]
    inside = {id(p) for m in (model.trunk, model.roi_head) for p in m.parameters() if p.requires_grad}
    param_share = sum(p.numel() for p in trained if id(p) in inside) / max(1, sum(p.numel() for p in trained))
    # In CPU time, which other processes on the machine do not inflate (the parts are timed apart).
    outside = result["train_cpu_s"]["ours"] - isolated["trunk_cpu"] - isolated["roi_head_layers_cpu"] - optimizer_cpu * param_share
    result["split"] = {
        "train_forward": stages["train"],
        "forward_s": median([t[0] for t in ours.train_times]),
        "backward_s": backward_s,
        "optimizer_s": optimizer_s,
        "forward_backward_optimizer_cpu_s": [median([t[i] for t in ours.train_cpu_split]) for i in range(3)],
        "infer": stages["infer"],
        "isolated": isolated,
        "trunk_and_head_param_share": param_share,
        "outside_cpu_s": outside,
        "outside_share": outside / result["train_cpu_s"]["ours"],
    }

    if args.data_images > 0:
        log("timing the DataLoader ...")
        ips = data_throughput(cfg, args.data_images)
        sps = 1.0 / train_s["ours"]
        result["data"] = {
            "images_per_s": ips,
            "train_steps_per_s": sps,
            "ratio": ips / (sps * len(batch)),
            "num_workers": int(cfg.data.num_workers),
        }

    if not args.no_memory:
        del contenders, tv
        gc.collect()
        log("peak memory, one child process each ...")
        result["memory"] = measure_memory(
            args,
            overrides,
            ["ours", "torchvision"] + (["torchvision_same"] if non_default else []),
            log,
        )

    if args.map_ckpt:
        log(f"validation mAP of {args.map_ckpt}, fp32 and bf16 autocast ...")
        result["bf16_map"] = precision_map(cfg, args.map_ckpt, log)

    result["machine"]["load_average"] = machine()["load_average"]
    log("")
    log(table(result))
    out = Path(args.out) if args.out else ROOT / "outputs" / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S") / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"bench.py: bad config override: {err}")
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"bench.py: {err}")
