"""The pipeline figures (fasterrcnn.analysis.explain, scripts/explain.py), from an untrained
model and from a checkpoint."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterrcnn.analysis import explain
from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.build import compose_config
from fasterrcnn.data.transforms import Preprocess, rescale_factor
from fasterrcnn.model import FasterRCNN
from fasterrcnn.training import train

from .conftest import SMALL_DATA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "explain.py"
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
PANELS = ["1_anchors", "2_anchor_targets", "3_proposals", "4_roi_samples", "5_detections", "pipeline"]


def run_explain(args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def counts(stdout: str, panel: str) -> dict[str, int]:
    """The ``key=value`` integers of the summary line of ``panel`` (e.g. ``"2 anchor targets"``)."""
    line = next(line for line in stdout.splitlines() if line.startswith(panel + ":"))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)\b(?![.\dx])", line)}


def assert_pngs(out: Path) -> None:
    for name in PANELS:
        path = out / f"{name}.png"
        assert path.is_file(), f"{path} missing"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_untrained_model_draws_every_panel_with_sane_counts(tmp_path, data_dir):
    out = tmp_path / "explain"
    stdout = run_explain(["--out", str(out), "--index", "1", f"paths.data_dir={data_dir}", *SMALL_DATA, *TINY_NET], cwd=tmp_path)
    assert_pngs(out)
    for name in PANELS:
        assert f"wrote {out / name}.png" in stdout
    assert "UNTRAINED" in stdout

    anchors = counts(stdout, "1 anchors")
    height, width = (int(v) for v in re.search(r"feature=(\d+)x(\d+)", stdout).groups())
    assert anchors["k"] == 15 and anchors["anchors"] == height * width * anchors["k"]  # anchor=small: 5 scales x 3 ratios
    rpn = counts(stdout, "2 anchor targets")
    assert 1 <= rpn["positives"] <= 128  # n_sample 256, at most half positive
    assert rpn["positives"] + rpn["negatives"] <= 256
    assert rpn["positives"] + rpn["negatives"] + rpn["ignored"] == anchors["anchors"]
    proposals = counts(stdout, "3 proposals")
    assert 0 < proposals["test"] <= 300 and proposals["drawn"] == min(50, proposals["test"])
    rois = counts(stdout, "4 roi samples")
    assert rois["rois"] <= 128 and rois["foreground"] <= 32  # 128 RoIs, at most 25% foreground
    assert rois["foreground"] + rois["background"] + rois["filler"] == rois["rois"]
    assert rois["foreground"] >= min(rois["gt"], 32)  # the ground truth joins the proposals
    assert counts(stdout, "5 detections")["gt"] >= rois["gt"]  # difficult objects are not targets


def test_checkpoint_model_is_explained_from_the_file_alone(make_cfg, tmp_path, data_dir, monkeypatch):
    few_steps = ["trainer.max_steps=3", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.max_epochs=1"]
    ckpt = train(make_cfg(TINY_NET + few_steps + ["data.min_size=200", "data.max_size=320"]))["checkpoints"]["last"]
    out = tmp_path / "explain_ckpt"
    # No TINY_NET and the default sizes (256/400): the detector, its classes and its
    # preprocessing (200/320) come from the checkpoint; the config only says where the data is.
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA], tmp_path)
    traces = []
    real_trace = FasterRCNN.trace

    def trace(self, *args, **kwargs):
        traces.append(real_trace(self, *args, **kwargs))
        return traces[-1]

    monkeypatch.setattr(FasterRCNN, "trace", trace)
    stdout = "\n".join(explain.explain(cfg, ckpt, out=out, score=0.0, max_dets=10))
    assert_pngs(out)
    assert f"checkpoint {ckpt}" in stdout and "UNTRAINED" not in stdout
    (t,) = traces  # one forward for every panel
    (oh, ow), (h, w) = t.original_sizes[0], t.image_sizes[0]
    scale = rescale_factor(oh, ow, 200, 320)  # the checkpoint's sizes, not the config's 256/400
    assert (h, w) == (round(oh * scale), round(ow * scale)) and max(h, w) <= 320
    detections = counts(stdout, "5 detections")["detections"]
    assert detections == len(t.testing.detections[0]["scores"]) > 0
    scores = [float(x) for x in re.findall(r"\w+ (\d\.\d\d)", stdout.split("5 detections:")[1])]
    assert len(scores) == min(detections, 10)  # the line lists the first 10
    assert scores == sorted(scores, reverse=True)
    rois = counts(stdout, "4 roi samples")
    assert rois["rois"] == t.training.rois.shape[0] and rois["proposals"] == t.training.proposals[0].shape[0]

    # data of other classes than the checkpoint's: refused, naming both
    other = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "data.classes=[circle,square,triangle,diamond,star,blob]"], tmp_path)
    with pytest.raises(ValueError, match=r"the checkpoint detects .*'cross'.*'blob'.* pass the data config it was trained for"):
        explain.explain(other, ckpt, out=tmp_path / "other")


def test_stages_come_from_one_trace(tmp_path, data_dir):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *TINY_NET], tmp_path)
    model, names, spec = explain.load_model(cfg, None)
    model.eval()
    item = explain.item_at(explain.load_split(cfg, "val", spec), 1)
    s = explain.run_stages(model, item, score=0.0, num_negatives=7, seed=3)
    keep = ~item["difficult"]
    torch.manual_seed(3)  # the same draws as run_stages
    with torch.no_grad():
        size, orig = s.size, tuple(item["original_size"])
        trace = model.trace(item["image"][None], [size], [orig], [item["boxes"][keep]], [item["labels"][keep]], detect=True, score_thresh=0.0)
    assert torch.equal(s.anchor_labels, trace.training.anchor_labels[0]) and torch.equal(s.rois, trace.training.rois)
    assert torch.equal(s.roi_labels, trace.training.roi_labels) and torch.equal(s.test_proposals, trace.testing.proposals[0])
    det = trace.testing.detections[0]
    assert torch.allclose(s.det_boxes, det["boxes"] * torch.tensor([size[1] / orig[1], size[0] / orig[0]] * 2))  # resized coordinates
    assert torch.equal(s.det_scores, det["scores"]) and s.num_gt == int(keep.sum())
    assert len(s.shown_negatives) == 7 and bool((s.anchor_labels[s.shown_negatives] == 0).all())
    assert s.anchors.shape[0] == s.feature_size[0] * s.feature_size[1] * s.k and s.cell_anchors.shape == (s.k, 4)


def test_anchors_of_a_cell_are_centred_on_it():
    gen = AnchorGenerator(scales=[1, 2, 4], ratios=[0.5, 1, 2], stride=16)
    anchors = gen(5, 7)
    i, j = explain.nearest_cell(x=100.0, y=40.0, stride=16, height=5, width=7)
    assert (i, j) == (2, 6)
    cell = explain.anchors_at(anchors, gen.num_anchors, 7, i, j)
    centres = (cell[:, :2] + cell[:, 2:]) / 2
    assert torch.allclose(centres, torch.tensor([(j + 0.5) * 16, (i + 0.5) * 16]).expand_as(centres))
    assert explain.nearest_cell(x=1e4, y=-5.0, stride=16, height=5, width=7) == (0, 6)  # clamped to the map


def test_untrained_backbone_is_never_downloaded(tmp_path):
    cfg = compose_config(["backbone=resnet18"], tmp_path)  # pretrained: true in the config
    model, names, spec = explain.load_model(cfg, None)
    assert names == list(cfg.data.classes) and model.num_classes == len(names)
    assert spec == model.preprocess == Preprocess.from_dict({**{k: cfg.data[k] for k in ("max_size", "mean", "std")}, "min_size": max(cfg.data.min_size)})


def test_index_out_of_range_is_an_error(tmp_path, data_dir):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, *TINY_NET], tmp_path)
    with pytest.raises(ValueError, match="--index 999 is out of range: the val split has 8 images"):
        explain.explain(cfg, index=999, out=tmp_path)
