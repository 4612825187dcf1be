"""What bf16 autocast costs in accuracy: a trained checkpoint's validation mAP and time per
image in fp32 and under bf16 autocast (the bench's ``--map-ckpt``), scored by the one evaluation
accumulator, :class:`fasterrcnn.evaluation.metrics.DetectionMetrics`."""

from __future__ import annotations

import contextlib
import time

import torch
from omegaconf import DictConfig

from fasterrcnn.bench.harness import Log, synchronizer
from fasterrcnn.build import build_datamodule
from fasterrcnn.evaluation.metrics import DetectionMetrics
from fasterrcnn.api import load_module

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def precision_map(cfg: DictConfig, ckpt_path: str, device: str = "cpu", log: Log = print) -> dict[str, dict[str, float]]:
    """Per precision (``fp32``, ``bf16``): ``map`` (VOC07 11-point, as validation), seconds per
    image of :meth:`FasterRCNN.predict <fasterrcnn.model.FasterRCNN.predict>` and the number of
    images, on the validation split of ``cfg.data``."""
    module = load_module(ckpt_path, torch.device(device))
    if list(cfg.data.classes) != module.class_names:
        raise ValueError(f"--map-ckpt {ckpt_path}: the checkpoint detects {module.class_names}, but data={cfg.data.name} has {list(cfg.data.classes)}")
    model, sync = module.model, synchronizer(torch.device(device))
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    out = {}
    for name, dtype in PRECISIONS.items():
        metrics = DetectionMetrics(module.class_names, use_07_metric=True, recall_counts=(), coco=False)
        seconds, n = 0.0, 0
        for batch in dm.val_dataloader():
            batch = batch.to(device)
            sync()
            t0 = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext():
                dets = model.predict(batch.images, batch.image_sizes, batch.original_sizes)
            sync()
            seconds += time.perf_counter() - t0
            n += len(batch)
            metrics.update_batch(dets, batch)
        out[name] = {"map": metrics.compute()["map"], "seconds_per_image": seconds / max(n, 1), "images": n}
        log(f"  {name}: val mAP {out[name]['map']:.4f}, {1000 * out[name]['seconds_per_image']:.1f} ms/image over {n} images")
    return out
