"""What a run logs: read back through wandb's offline transaction log and the CSV logger."""

import json
from pathlib import Path

import pytest

from fasterrcnn.training import train

from .wandb_offline import read_run

TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=3", "trainer.log_every_n_steps=1"]
STEP_KEYS = ["train/loss", "train/rpn_cls", "train/rpn_loc", "train/roi_cls", "train/roi_loc", "train/num_pos_anchors", "train/num_pos_rois"]
VAL_KEYS = ["val/map", "val/map_voc07", "val/map_voc10", "val/loss", "val/recall/300@0.5", "val/recall/2000@0.7", "val/coco/map", "val/coco/map_50"]


def test_wandb_offline_run_has_scalars_image_panel_and_config(make_cfg):
    cfg = make_cfg(TINY_NET + SHORT + ["logger=wandb", "logger.wandb.offline=true", "evaluation.panel_images=2"])
    train(cfg)
    out = Path(cfg.paths.output_dir)
    run = read_run(str(out))
    keys = run.history_keys
    for key in STEP_KEYS + VAL_KEYS:
        assert key in keys, key
    assert any(k.startswith("lr-") for k in keys), "learning rate"
    assert any(k.startswith("val/ap/") for k in keys), "per-class AP"
    # the fixed image panel: 2 images (one key each), three box layers, class names and scores
    panel = next(row for row in run.history if "val/examples/0/_type" in row)
    assert "val/examples/1/_type" in panel and "val/examples/2/_type" not in panel
    assert [panel[f"val/examples/{i}/caption"] for i in (0, 1)] == ["000024", "000025"]  # the first val images
    run_dir = next(p for p in out.glob("wandb/offline-run-*") if p.is_dir())
    for i in (0, 1):
        assert panel[f"val/examples/{i}/_type"] == "image-file"
        layer = {
            name: json.loads((run_dir / "files" / panel[f"val/examples/{i}/boxes/{name}/path"]).read_text())
            for name in ("ground_truth", "proposals", "predictions")
        }
        assert layer["ground_truth"]["box_data"], "ground truth drawn"
        assert len(layer["proposals"]["box_data"]) == 20
        for box in layer["predictions"]["box_data"]:  # captions 'name score' and a score for the slider
            name, score = box["box_caption"].rsplit(" ", 1)
            assert name in cfg.data.classes and float(score) == pytest.approx(box["scores"]["score"], abs=0.006)
    class_labels = run.config["_wandb"]["bounding_box/class_labels"]
    assert any(v["value"].get("1") == "circle" for v in class_labels.values())
    # PR curves at the end, also as a PNG in the run's folder
    assert "val/pr_curves/_type" in keys and (out / "pr_curves.png").is_file()
    # the resolved config (every group) and a clean finish
    for group in ("anchor", "sampler", "backbone", "optim", "data", "evaluation"):
        assert group in run.config, group
    assert run.config["sampler"]["anchor_target"]["n_sample"] == 256
    assert run.exit_code == 0


def test_csv_log_has_the_same_scalars(make_cfg):
    cfg = make_cfg(TINY_NET + SHORT + ["logger=csv"])
    train(cfg)
    header = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in STEP_KEYS + VAL_KEYS:
        assert key in header, key
    assert any(k.startswith("lr-") for k in header)


@pytest.mark.parametrize("panel_images", [0])
def test_no_logger_logs_nothing_but_metrics_json_has_the_validation_keys(make_cfg, panel_images):
    cfg = make_cfg(TINY_NET + SHORT + [f"evaluation.panel_images={panel_images}"])
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert not (out / "wandb").exists() and not (out / "csv").exists()
    for key in VAL_KEYS:
        assert key in metrics["final"], key
