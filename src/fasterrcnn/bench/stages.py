"""Where our training step and inference spend their time, read from the model's own code path.

* :func:`profile_stages`: one profiled ``losses`` step and one ``predict`` call
  (:class:`~fasterrcnn.bench.harness.Contender`, i.e. :meth:`FasterRCNN.trace`); each forward
  stage is the time of its ``torch.profiler.record_function`` scope in :mod:`fasterrcnn.model`
  and :mod:`fasterrcnn.heads` (the scopes do not nest, so they add up to at most the step);
* :func:`isolated_layers`: the trunk alone and the RoI head's layers alone (forward and
  backward, on the RoIs a traced training step sampled), to tell what share of a step lies
  outside the network's big layers;
* :func:`time_split`: both, with the interleaved runs' backward and optimiser step, as the
  bench's ``split``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fasterrcnn.bench.harness import Contender, median
from fasterrcnn.data import DetectionBatch
from fasterrcnn.lit import training_targets
from fasterrcnn.model import FasterRCNN

# The record_function scopes of fasterrcnn.model (and the RoI head's two), in the order they run.
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
INFER_STAGES = ("backbone", "rpn_head", "anchors", "proposal_creator", "roi_pool", "roi_head_layers", "postprocess")


def profile_stages(contender: Contender, steps: int = 1) -> dict[str, dict[str, float] | float]:
    """Seconds per call in each scope of :data:`TRAIN_STAGES` during ``steps`` training steps of
    ``contender`` (ours) and of :data:`INFER_STAGES` during as many inferences.

    Returns ``train`` and ``infer`` (stage -> seconds) and ``train_step_s`` and ``infer_s``,
    the wall-clock time of those profiled calls (profiler overhead included), which the stages
    sum to at most. A stage missing from the profile raises (a renamed scope would otherwise
    read as 0 s).

    On a GPU the stage times are the GPU time of the kernels each scope launched (the host's
    time in a scope is mostly launching, or waiting at a sync), and ``train_host`` and
    ``infer_host`` hold the host's."""
    out: dict[str, dict[str, float] | float] = {}
    cuda = contender.images.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    for mode, stages, fn in (("train", TRAIN_STAGES, contender.train_step), ("infer", INFER_STAGES, contender.infer)):
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            contender.sync()
            elapsed = (time.perf_counter() - start) / steps
        totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
        missing = [s for s in stages if s not in totals]
        if missing:
            raise RuntimeError(f"no record_function scope {', '.join(missing)} in the profile of our {mode} step (renamed in fasterrcnn.model?)")
        out[mode] = {s: totals[s] / 1e6 / steps for s in stages}
        if cuda:
            out[mode + "_host"] = out[mode]
            out[mode] = {s: t / 1e6 / steps for s, t in _device_times(prof, stages).items()}
        out["train_step_s" if mode == "train" else "infer_s"] = elapsed
    return out


def _device_times(prof: profile, stages: tuple[str, ...]) -> dict[str, float]:
    """Microseconds of GPU kernels launched inside each ``record_function`` scope: summed over
    the host-side events of the scope (the profiler also records each scope as a GPU-side
    annotation under the same name, which ``key_averages`` would add in a second time)."""
    totals = dict.fromkeys(stages, 0.0)
    for event in prof.events():
        if event.name in totals and event.device_type == DeviceType.CPU:
            totals[event.name] += getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
    return totals


def isolated_layers(model: FasterRCNN, batch: DetectionBatch, repeats: int, autocast: Callable, sync: Callable[[], None]) -> dict[str, float]:
    """Median forward + backward seconds (wall-clock, and CPU time as ``<name>_cpu``) of the trunk
    alone and of the RoI head's layers alone, as they run inside a training step: the head on
    the pooled RoIs of one traced training step (``num_rois`` of them)."""
    model.train()
    images = batch.images.contiguous(memory_format=torch.channels_last) if model.channels_last else batch.images
    head = model.roi_head
    with torch.no_grad(), autocast():
        trace = model.trace(batch.images, batch.image_sizes, batch.image_sizes, *training_targets(batch))
        sampled = trace.training
        pooled = head.pool(trace.features, sampled.rois, sampled.roi_batch_index)  # (R, C, S, S)

    def trunk() -> None:
        with autocast():
            out = model.trunk(images)
        out.backward(torch.ones_like(out))

    def head_layers() -> None:
        with autocast():
            x = head.head(pooled)
            out = head.cls_score(x).float().sum() + head.bbox_pred(x).float().sum()
        out.backward()

    result = {"num_rois": float(pooled.shape[0])}
    for name, fn in (("trunk", trunk), ("roi_head_layers", head_layers)):
        times, cpu = [], []
        for r in range(repeats + 1):  # the first is a warm-up
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


def time_split(ours: Contender, batch: DetectionBatch, profile_steps: int, repeats: int) -> dict:
    """The bench's ``split`` of our training step (after :func:`run_interleaved
    <fasterrcnn.bench.harness.run_interleaved>` has recorded ``ours``' runs).

    ``outside_cpu_s`` is the training step's CPU time minus the trunk's and the RoI head
    layers' (each timed alone) and their share of the optimiser step (by their share of the
    trained parameters): CPU time, which other processes on the machine do not inflate.
    ``outside_s`` and ``outside_share_wall`` are the same in wall-clock time, the figure that
    means something on a GPU (where the host's CPU time is mostly launching and waiting)."""
    model: FasterRCNN = ours.model  # type: ignore[assignment]
    stages = profile_stages(ours, profile_steps)
    isolated = isolated_layers(model, batch, repeats, ours.autocast, ours.sync)
    cpu_split = [median([t[i] for t in ours.train_cpu_split]) for i in range(3)]
    trained = [p for p in model.parameters() if p.requires_grad]
    inside = {id(p) for m in (model.trunk, model.roi_head) for p in m.parameters() if p.requires_grad}
    param_share = sum(p.numel() for p in trained if id(p) in inside) / max(1, sum(p.numel() for p in trained))
    step_cpu = median(ours.train_cpu)
    outside = step_cpu - isolated["trunk_cpu"] - isolated["roi_head_layers_cpu"] - cpu_split[2] * param_share
    step_wall = median([sum(t) for t in ours.train_times])
    outside_wall = step_wall - isolated["trunk"] - isolated["roi_head_layers"] - median([t[2] for t in ours.train_times]) * param_share
    return {
        "train_forward": stages["train"],
        "profiled_train_step_s": stages["train_step_s"],
        "forward_s": median([t[0] for t in ours.train_times]),
        "backward_s": median([t[1] for t in ours.train_times]),
        "optimizer_s": median([t[2] for t in ours.train_times]),
        "forward_backward_optimizer_cpu_s": cpu_split,
        "infer": stages["infer"],
        "profiled_infer_s": stages["infer_s"],
        "isolated": isolated,
        "trunk_and_head_param_share": param_share,
        "outside_cpu_s": outside,
        "outside_share": outside / step_cpu,
        "outside_s": outside_wall,
        "outside_share_wall": outside_wall / step_wall,
    }

