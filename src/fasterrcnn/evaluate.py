"""``evaluate(cfg)``: score a checkpoint on a split and write what the devkit and people read.
``src/eval.py`` is a thin Hydra entry point around it (config: ``conf/eval.yaml``)."""

from __future__ import annotations

import os
import time

from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from fasterrcnn.build import build_datamodule
from fasterrcnn.evaluation.metrics import DetectionMetrics
from fasterrcnn.data.sources import find_coco
from fasterrcnn.evaluation.results import per_class_table, plot_pr_curves, write_coco_files, write_voc_results
from fasterrcnn.metrics_file import json_safe, write_json
from fasterrcnn.api import load_module, resolve_device
from fasterrcnn.threads import set_threads

SPLITS = ("val", "test", "test_shift")  # data.val_sets, data.test_sets, data.shift_sets


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split`` of ``cfg.data``; returns ``metrics.json``'s contents.

    Writes into ``cfg.paths.output_dir``: ``metrics.json``, ``per_class.md``, ``pr_curves.png``,
    ``results/comp4_det_<image set>_<class>.txt``, ``results/coco_<image set>_bbox.json`` (and,
    unless the data is one COCO file, the ``coco_<image set>_gt.json`` it refers to) and
    ``config.yaml``.
    """
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (data.val_sets / data.test_sets / data.shift_sets), not {cfg.split!r}")
    output_dir = cfg.paths.output_dir
    os.makedirs(output_dir, exist_ok=True)
    device = resolve_device(cfg.device)
    set_threads(cfg.get("threads", "auto"))  # fasterrcnn.threads: leave busy cores to their processes
    module = load_module(cfg.ckpt_path, device)
    model_cfg = module.hparams["model_cfg"]
    classes = list(model_cfg["classes"])
    if list(cfg.data.classes) != classes:
        raise ValueError(
            f"{cfg.ckpt_path}: the checkpoint detects {classes}, but data={cfg.data.name} has {list(cfg.data.classes)};"
            " pass the data config it was trained for (data=...)"
        )
    # The images are prepared as the model was trained (the checkpoint carries it), unless
    # min_size / max_size are given.
    spec = module.model.preprocess
    with open_dict(cfg):
        cfg.backbone = OmegaConf.create(model_cfg["backbone"])
        if "preprocess" in model_cfg:
            cfg.data.min_size, cfg.data.max_size = spec.min_size, spec.max_size
        if "test_min_size" in cfg.data:
            cfg.data.test_min_size = None  # data.min_size is now the one test size
        cfg.data.mean, cfg.data.std = list(spec.mean), list(spec.std)
        for key in ("min_size", "max_size"):
            if cfg.get(key) is not None:
                cfg.data[key] = int(cfg[key])
    OmegaConf.save(cfg, os.path.join(output_dir, "config.yaml"), resolve=True)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    loader = datamodule.eval_dataloader(cfg.split)
    sets = datamodule.sets[cfg.split]
    image_set = sets[0]["split"] if len(sets) == 1 else "+".join(s["split"] for s in sets)

    model = module.model
    metrics = DetectionMetrics(classes, cfg.use_07_metric, cfg.recall_counts, cfg.recall_ious, coco=cfg.coco)
    image_ids: list[str] = []
    detections: list[dict] = []
    ground_truth: list[dict] = []
    start = time.time()
    for batch in tqdm(loader, desc=f"evaluating {cfg.data.name} {image_set}", unit="img"):
        batch = batch.to(device)
        outputs = model.predict(
            batch.images,
            batch.image_sizes,
            batch.original_sizes,
            return_proposals=metrics.recall is not None,
            num_proposals=metrics.max_proposals,
            nms_thresh=cfg.get("nms_thresh"),
        )
        metrics.update_batch(outputs, batch)
        image_ids += batch.image_ids
        detections += [{k: det[k].cpu() for k in ("boxes", "scores", "labels")} for det in outputs]
        ground_truth += [  # for the COCO ground-truth file of VOC-layout data
            {"boxes": b.cpu(), "labels": lab.cpu(), "difficult": d.cpu(), "size": s}
            for b, lab, d, s in zip(batch.original_boxes, batch.labels, batch.difficult, batch.original_sizes)
        ]
    summary = metrics.compute()
    per_class = metrics.per_class()

    results_dir = os.path.join(output_dir, "results")
    write_voc_results(results_dir, image_set, classes, image_ids, detections)
    coco_files = write_coco_files(results_dir, image_set, classes, image_ids, detections, ground_truth, find_coco(loader.dataset))
    with open(os.path.join(output_dir, "per_class.md"), "w") as f:
        f.write(per_class_table(per_class, summary))
    aps = {name: c["ap_voc07" if cfg.use_07_metric else "ap_voc10"] for name, c in per_class.items()}
    plot_pr_curves(metrics.pr_curves(), aps, os.path.join(output_dir, "pr_curves.png"), title=f"{cfg.data.name} {image_set}: precision-recall (AP)")

    data = {
        "status": "completed",
        "ckpt_path": os.path.abspath(cfg.ckpt_path),
        "data": cfg.data.name,
        "split": cfg.split,
        "image_set": image_set,
        "num_images": len(image_ids),
        "metrics": {f"{cfg.split}/{k}": v for k, v in summary.items()},
        "per_class": per_class,
        "results_dir": results_dir,
        **coco_files,  # coco_results, coco_gt (fasterrcnn.evaluation.results.write_coco_files)
        "output_dir": output_dir,
        "eval_time_s": round(time.time() - start, 2),
    }
    data = json_safe(data)
    write_json(os.path.join(output_dir, "metrics.json"), data)
    print(per_class_table(per_class, summary))
    print(f"{cfg.split}/map = {summary['map']:.4f}; results in {output_dir}", flush=True)
    return data
