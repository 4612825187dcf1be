"""src/eval.py and the metrics beside VOC AP: result files an independent devkit scorer agrees
with, proposal recall, COCO-style AP with difficult objects as crowd."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterrcnn.build import CONF_DIR
from fasterrcnn.evaluate import evaluate
from fasterrcnn.evaluation.metrics import DetectionMetrics
from fasterrcnn.evaluation.recall import ProposalRecall, best_iou_at_counts
from fasterrcnn.evaluation.results import write_voc_results
from fasterrcnn.training import train

from .conftest import SMALL_DATA, compose_config
from .devkit_reference import voc_eval

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
CLASSES = ["circle", "square", "triangle", "diamond", "star", "cross"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A tiny model trained long enough to detect something (about 20 s)."""
    out = tmp_path_factory.mktemp("train")
    cfg = compose_config(
        [f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY_NET,
         "trainer.max_epochs=3", "optim.warmup_steps=10", "evaluation.coco=false", "augment=paper", "data.min_size=256"]
    )  # fmt: skip
    metrics = train(cfg)
    return {"ckpt": metrics["checkpoints"]["last"], "data_dir": data_dir, "metrics": metrics}


def _eval_cfg(trained, out, extra=(), small_data=True):
    with_cfg = [f"ckpt_path={trained['ckpt']}", f"paths.output_dir={out}", f"paths.data_dir={trained['data_dir']}", *(SMALL_DATA if small_data else []), *extra]
    return compose_config(with_cfg, config_name="eval")


def test_eval_map_equals_independent_devkit_scoring_of_its_result_files(trained, tmp_path):
    result = evaluate(_eval_cfg(trained, tmp_path, ["split=val"]))
    m = result["metrics"]
    assert result["num_images"] == 8 and m["val/map"] > 0.0, "the fixture should detect something"
    root = next(Path(trained["data_dir"]).glob("shapes-*"))
    for use_07, key in ((True, "val/map_voc07"), (False, "val/map_voc10")):
        aps = [voc_eval(str(tmp_path / "results" / f"comp4_det_val_{c}.txt"), str(root), "val", c, use_07) for c in CLASSES]
        valid = [a for a in aps if not math.isnan(a)]
        assert abs(sum(valid) / len(valid) - m[key]) < 1e-4
    # the same numbers as the training run's last validation (same weights, same split)
    assert m["val/map"] == pytest.approx(trained["metrics"]["final"]["val/map"], abs=1e-9)
    for name in ("metrics.json", "per_class.md", "pr_curves.png", "config.yaml"):
        assert (tmp_path / name).is_file()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/coco/map", "val/coco/map_50", "val/recall/300@0.5", "val/recall/2000@0.7", "val/ap/circle"):
        assert key in on_disk["metrics"]
    assert set(on_disk["per_class"]) == set(CLASSES)
    assert "| circle |" in (tmp_path / "per_class.md").read_text()


def _detections(results_dir: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in results_dir.glob("comp4_det_val_*.txt"))


def test_eval_nms_thresh_overrides_the_checkpoints(trained, tmp_path):
    """``nms_thresh`` replaces the checkpoint's per-class NMS (0.3): 1.0 suppresses nothing,
    so it keeps more detections; null keeps the checkpoint's."""
    default = evaluate(_eval_cfg(trained, tmp_path / "default", ["split=val", "coco=false"]))
    same = evaluate(_eval_cfg(trained, tmp_path / "same", ["split=val", "coco=false", "nms_thresh=0.3"]))
    loose = evaluate(_eval_cfg(trained, tmp_path / "loose", ["split=val", "coco=false", "nms_thresh=1.0"]))
    assert same["metrics"]["val/map"] == default["metrics"]["val/map"]
    assert _detections(tmp_path / "same" / "results") == _detections(tmp_path / "default" / "results")
    assert _detections(tmp_path / "loose" / "results") > _detections(tmp_path / "default" / "results")
    assert loose["metrics"]["val/recall/300@0.5"] == default["metrics"]["val/recall/300@0.5"]  # the proposals are the RPN's


def test_eval_cli_writes_into_its_own_folder_and_rejects_foreign_data(trained, tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, str(REPO / "src" / "eval.py"), f"ckpt_path={trained['ckpt']}", f"paths.data_dir={trained['data_dir']}",
            f"hydra.run.dir={out}", "coco=false", *SMALL_DATA]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "metrics.json").read_text())
    assert data["split"] == "test" and data["num_images"] == 8 and "test/coco/map" not in data["metrics"]
    assert len(list((out / "results").glob("comp4_det_test_*.txt"))) == 6
    # a checkpoint evaluated on a dataset with other classes is refused, naming the mismatch
    with pytest.raises(ValueError, match="detects"):
        evaluate(_eval_cfg(trained, tmp_path / "x", ["data=voc", "data.root=/nowhere", "data.classes=[a,b]"], small_data=False))
    with pytest.raises(RuntimeError, match="nosuch.ckpt"):
        evaluate(_eval_cfg(trained, tmp_path / "y", ["ckpt_path=/nowhere/nosuch.ckpt"]))


def test_results_files_use_voc_one_based_coordinates(tmp_path):
    det = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([2])}
    paths = write_voc_results(str(tmp_path), "test", ["a", "b"], ["000001"], [det])
    assert Path(paths[0]).read_text() == ""  # class a: no detection, still a file
    assert Path(paths[1]).name == "comp4_det_test_b.txt"
    assert Path(paths[1]).read_text() == "000001 0.500000 1.000 1.000 10.000 20.000\n"


def test_proposal_recall_counts_top_n_and_ignores_difficult():
    proposals = torch.tensor([[100.0, 100, 110, 110], [0, 0, 10, 10], [50, 50, 60, 70]])  # by score
    gt = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [200, 200, 210, 210]])
    best = best_iou_at_counts(proposals, gt, [1, 2, 3, 5])
    assert best[0].tolist() == [0.0, 1.0, 1.0, 1.0]  # found by the 2nd proposal
    assert best[1, 2].item() == pytest.approx(0.5)  # 100 / 200
    assert best[2].tolist() == [0.0] * 4  # never found
    recall = ProposalRecall(counts=(1, 2, 3), iou_thresholds=(0.5, 0.7))
    recall.update(proposals, gt, torch.tensor([False, False, True]))  # the missed box is difficult
    r = recall.compute()
    assert r["1@0.5"] == 0.0 and r["2@0.5"] == 0.5 and r["3@0.5"] == 1.0 and r["3@0.7"] == 0.5
    empty = ProposalRecall(counts=(300,))
    empty.update(torch.zeros(0, 4), gt)
    assert empty.compute()["300@0.5"] == 0.0


def test_coco_style_map_treats_difficult_objects_as_crowd():
    gt_boxes = torch.tensor([[0.0, 0, 50, 50], [100, 100, 150, 150]])
    gt_labels = torch.tensor([1, 1])
    # the higher-scored detection hits the difficult object: ignored, not a false positive
    det = {"boxes": gt_boxes.clone(), "scores": torch.tensor([0.6, 0.9]), "labels": torch.tensor([1, 1])}
    results = {}
    for difficult in (False, True):
        metrics = DetectionMetrics(["a"], recall_counts=())
        metrics.update(det, gt_boxes, gt_labels, torch.tensor([False, difficult]))
        results[difficult] = metrics.compute()
    assert results[True]["coco/map_50"] == pytest.approx(1.0)
    assert results[False]["coco/map_50"] == pytest.approx(1.0)
    # the VOC and COCO numbers come side by side, labelled
    assert {"map", "map_voc07", "map_voc10", "ap/a", "coco/map", "coco/map_50"} <= set(results[True])
    # a detection of a difficult object's class that misses it costs precision only when not crowd
    det_fp = {"boxes": torch.tensor([[100.0, 100, 140, 150], [0, 0, 50, 50]]), "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 1])}
    m = DetectionMetrics(["a"], recall_counts=())
    m.update(det_fp, gt_boxes[:1], gt_labels[:1], torch.tensor([False]))
    assert m.compute()["coco/map_50"] < 1.0


def test_eval_config_composes_from_the_shared_tree():
    cfg = compose_config(["ckpt_path=x.ckpt"], config_name="eval")
    assert cfg.split == "test" and cfg.data.name == "shapes" and list(cfg.recall_counts) == [300, 1000, 2000]
    assert (CONF_DIR / "eval.yaml").is_file()


def test_ddp_sync_restores_dataset_order_and_drops_sampler_padding(monkeypatch):
    """Two ranks of a DistributedSampler over 5 images: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3
    and image 0 again as padding. After sync every image counts once, in dataset order."""
    def image(i):
        box = torch.tensor([[float(i), 0.0, i + 10.0, 10.0]])
        return {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "proposals": box}, box

    ranks = []
    for indices in ([0, 2, 4], [1, 3, 0]):
        m = DetectionMetrics(["a"], recall_counts=(1,), coco=False)
        for i in indices:
            det, gt = image(i)
            m.update(det, gt, torch.tensor([1]), torch.tensor([False]))
        ranks.append(m)
    payload = [(m.voc.images, m.recall.best) for m in ranks]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), payload))
    ranks[0].sync(num_images=5)
    assert ranks[0].num_images == 5 and len(ranks[0].recall.best) == 5
    assert [rec.gt_boxes[0, 0].item() for rec in ranks[0].voc.images] == [0, 1, 2, 3, 4]
