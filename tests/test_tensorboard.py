"""logger=tensorboard (and combinations): read the event files back with TensorBoard's own reader."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from fasterrcnn.dashboards import PANEL_GAP, PR_THRESHOLDS, TITLE_HEIGHT, PanelSample, pr_curve_counts, tensorboard_panel
from fasterrcnn.training import train

from .conftest import SMALL_DATA, compose_config
from .test_dashboards import SHORT, STEP_KEYS, TINY_NET, VAL_KEYS
from .wandb_offline import read_run


REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle", "diamond", "star", "cross"]


def read_events(folder: Path) -> EventAccumulator:
    """Every event of the run's TensorBoard folder (all event files, no sampling)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_run_has_scalars_image_panel_and_pr_curves(make_cfg):
    cfg = make_cfg(TINY_NET + SHORT + ["logger=tensorboard", "evaluation.panel_images=2"])
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    events = read_events(out / "tensorboard")
    tags = events.Tags()
    scalars = set(tags["scalars"])
    for key in STEP_KEYS + VAL_KEYS:
        assert key in scalars, key
    assert any(k.startswith("lr-") for k in scalars) and any(k.startswith("val/ap/") for k in scalars)
    assert "hp_metric" not in scalars  # default_hp_metric: false
    assert events.Scalars("val/map")[-1].value == pytest.approx(metrics["final"]["val/map"], abs=1e-6)
    assert len(events.Scalars("train/loss")) == 4  # every step (log_every_n_steps=1)

    # the panel: 2 images (one tag each), ground truth | proposals | predictions side by side
    assert {"val/examples/0", "val/examples/1", "val/pr_curves"} <= set(tags["images"])
    assert "val/examples/2" not in tags["images"]
    shot = events.Images("val/examples/0")[-1]
    assert shot.step == 4
    panel = np.asarray(Image.open(io.BytesIO(shot.encoded_image_string)).convert("RGB"))
    width = (shot.width - 2 * PANEL_GAP) // 3
    assert shot.width == 3 * width + 2 * PANEL_GAP and 224 <= shot.height - TITLE_HEIGHT <= 400
    gt, props = (panel[TITLE_HEIGHT:, k * (width + PANEL_GAP) : k * (width + PANEL_GAP) + width] for k in (0, 1))
    assert (gt != props).any()  # different boxes on the same image
    assert (out / "pr_curves.png").is_file()

    # one interactive PR curve per class with ground truth: 6 rows (TP, FP, TN, FN, precision, recall)
    curves = [t for t in tags["tensors"] if t.startswith("val/pr_curve/")]
    assert curves and set(curves) <= {f"val/pr_curve/{c}" for c in CLASSES}
    for tag in curves:
        assert events.SummaryMetadata(tag).plugin_data.plugin_name == "pr_curves"
        event = events.Tensors(tag)[-1]
        tp, fp, tn, fn, precision, recall = make_ndarray(event.tensor_proto)
        assert event.step == 4 and tp.shape == (PR_THRESHOLDS,)
        assert (np.diff(tp) <= 0).all() and (np.diff(fp) <= 0).all()  # fewer detections at higher thresholds
        assert len(set(tp + fn)) == 1 and (tn == 0).all()  # TP + FN = the class's objects
        assert ((0 <= precision) & (precision <= 1) & (0 <= recall) & (recall <= 1)).all()


def test_csv_and_tensorboard_together_log_the_same_scalars(make_cfg):
    cfg = make_cfg(TINY_NET + SHORT + ["logger=[csv,tensorboard]"])
    assert list(cfg.logger) == ["csv", "tensorboard"]
    train(cfg)
    out = Path(cfg.paths.output_dir)
    header = set((out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")) - {"epoch", "step"}
    scalars = set(read_events(out / "tensorboard").Tags()["scalars"]) - {"epoch"}
    assert header == scalars


def test_wandb_and_tensorboard_from_the_command_line(tmp_path, data_dir):
    """`logger=[wandb,tensorboard]`: both get the scalars, the panel and the PR curves."""
    out = tmp_path / "run"
    args = [f"hydra.run.dir={out}", f"paths.data_dir={data_dir}", "logger=[wandb,tensorboard]", "logger.wandb.offline=true"]
    args += [*SMALL_DATA, *TINY_NET, *SHORT, "evaluation.panel_images=1"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = read_events(out / "tensorboard").Tags()
    assert "val/map" in tags["scalars"] and {"val/examples/0", "val/pr_curves"} <= set(tags["images"])
    run = read_run(str(out))
    assert "val/map" in run.history_keys and "val/examples/0/_type" in run.history_keys and "val/pr_curves/_type" in run.history_keys
    assert run.exit_code == 0


def test_logger_groups_compose_singly_and_as_lists():
    base = ["paths.output_dir=/unused"]
    assert list(compose_config(base + ["logger=tensorboard"]).logger) == ["tensorboard"]
    assert list(compose_config(base + ["logger=[wandb,tensorboard]"]).logger) == ["wandb", "tensorboard"]
    assert not compose_config(base + ["logger=none"]).logger
    tb = compose_config(base + ["logger=tensorboard"]).logger.tensorboard
    assert tb.save_dir == "/unused" and tb.name == "tensorboard" and tb.version == ""


def test_pr_curve_counts_at_score_thresholds():
    scores = torch.tensor([0.95, 0.8, 0.8, 0.4, 0.1], dtype=torch.double)
    tp = torch.tensor([True, True, False, False, True])
    fp = torch.tensor([False, False, True, False, False])  # the 4th matched a difficult object: neither
    c = pr_curve_counts(scores, tp, fp, npos=5, num_thresholds=11)
    # thresholds 0, 0.2, 0.5, 0.9, 1: five detections, four, three, one, none
    at = [0, 2, 5, 9, 10]
    assert c["true_positive_counts"][at].tolist() == [3, 2, 2, 1, 0]
    assert c["false_positive_counts"][at].tolist() == [1, 1, 1, 0, 0]
    assert c["false_negative_counts"][at].tolist() == [2, 3, 3, 4, 5]
    assert c["precision"][at].tolist() == pytest.approx([0.75, 2 / 3, 2 / 3, 1.0, 0.0])
    assert c["recall"][at].tolist() == pytest.approx([0.6, 0.4, 0.4, 0.2, 0.0])
    empty = pr_curve_counts(torch.zeros(0, dtype=torch.double), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), npos=3)
    assert (empty["true_positive_counts"] == 0).all() and (empty["false_negative_counts"] == 3).all()


def test_tensorboard_panel_draws_three_views_and_filters_predictions_by_score():
    image = torch.full((3, 60, 80), 128, dtype=torch.uint8)
    sample = PanelSample(
        image_id="x",
        image=image,
        gt_boxes=torch.tensor([[10.0, 10.0, 30.0, 40.0]]),
        gt_labels=[1],
        gt_difficult=[False],
        proposals=torch.tensor([[5.0, 5.0, 50.0, 50.0]]),
        boxes=torch.tensor([[40.0, 20.0, 70.0, 50.0], [0.0, 0.0, 20.0, 20.0]]),
        labels=[2, 3],
        scores=torch.tensor([0.9, 0.1]),
    )
    out = tensorboard_panel(sample, CLASSES, min_score=0.3)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 60 + TITLE_HEIGHT, 3 * 80 + 2 * PANEL_GAP)
    gt, props, preds = (out[:, TITLE_HEIGHT:, k * (80 + PANEL_GAP) : k * (80 + PANEL_GAP) + 80] for k in range(3))
    assert (gt[:, 10, 10:30] != 128).any() and (gt[:, 45:, 45:] == 128).all()  # the ground-truth box only
    assert (props[:, 5, 5:50] != 128).any()
    assert (preds[:, 49, 40:70] != 128).any() and (preds[:, 5:19, 0] == 128).all()  # 0.9 drawn, 0.1 left out
