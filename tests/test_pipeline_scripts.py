"""The pipeline tools: scripts/anchor_coverage.py, scripts/inspect_shapes.py and
scripts/check_dataset.py, over fasterrcnn.analysis and fasterrcnn.data.check.

Each script runs once as a subprocess on the small built-in data; the coverage computation is
also checked on constructed cases where the answer is known, and the shape report against the
trace it reads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterrcnn.analysis import coverage, coverage_report
from fasterrcnn.analysis.shapes import shapes_report
from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.build import compose_config
from fasterrcnn.creators import AnchorTargetCreator
from fasterrcnn.heads import RoIHead, RPNHead
from fasterrcnn.model import FasterRCNN

from .conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run_script(name: str, args: list[str], cwd: Path, status: int = 0) -> str:
    """Run a script in a fresh interpreter on one thread; its stdout (fails with its stderr
    unless it exits with ``status``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == status, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def table_rows(text: str) -> dict[str, list[str]]:
    """The Markdown table's data rows by their first cell."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "anchors" and not cells[0].startswith("---"):
            rows[cells[0]] = cells
    return rows


# ---------------------------------------------------------------------------- anchor_coverage
def test_anchor_coverage_script_compares_every_anchor_group(tmp_path, data_dir):
    out = tmp_path / "cov" / "coverage.png"
    args = ["--images", "8", "--out", str(out), f"paths.data_dir={data_dir}", *SMALL_DATA]
    stdout = run_script("anchor_coverage", args, tmp_path)
    rows = table_rows(stdout)
    assert list(rows) == coverage_report.anchor_groups()
    assert rows["k9"][1].startswith("[8, 16, 32]") and rows["k9"][2] == "[0.5, 1, 2]" and rows["k9"][3] == "9"
    assert rows["small"][3] == "15" and rows["k3_scales"][3] == "3"
    for name, cells in rows.items():
        share_07, share_05, median = (float(c) for c in cells[4:7])
        positives, unsampled, low = (float(c) for c in cells[7:10])
        assert 0.0 <= share_07 <= share_05 <= 1.0, name
        assert 0.0 <= median <= 1.0, name
        assert 0.0 <= positives <= unsampled and low <= unsampled, name
        assert positives <= 128, name  # AnchorTargetCreator's cap: 256 * 0.5
    assert "first 8 training images of `shapes`" in stdout
    assert out.is_file() and out.stat().st_size > 0
    assert table_rows(out.with_suffix(".md").read_text()) == rows


def test_expand_overrides_sweeps_only_anchors():
    expand_overrides = coverage_report.expand_overrides
    groups = coverage_report.anchor_groups()
    assert [g for g in groups if g in ("k3_ratios", "k3_scales", "k9", "k15", "small")] == ["k3_ratios", "k3_scales", "k9", "k15", "small"]
    assert expand_overrides(["data.num_workers=0"]) == [["data.num_workers=0", f"anchor={g}"] for g in groups]
    assert expand_overrides(["anchor=k9", "anchor.scales=[4,8,16],[8,16,32]"]) == [
        ["anchor=k9", "anchor.scales=[4,8,16]"],
        ["anchor=k9", "anchor.scales=[8,16,32]"],
    ]
    assert expand_overrides(["anchor=k9,k15"]) == [["anchor=k9"], ["anchor=k15"]]
    assert expand_overrides(["anchor.scales=[2,4]"]) == [["anchor.scales=[2,4]"]]  # the default group only
    with pytest.raises(ValueError, match="only anchor"):
        expand_overrides(["optim.lr=1e-3,1e-2"])


def _sample(boxes: list[list[float]], size=(64, 64)):
    """A 64 x 64 image with a 4 x 4 feature map (stride 16)."""
    return coverage.Sample(image_size=size, feature_size=(4, 4), gt_boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


def test_coverage_numbers_on_a_constructed_case():
    # 32 x 32 anchors centred at 8 + 16 j: the four inside a 64 x 64 image are
    # [8, 8, 40, 40], [24, 8, 56, 40], [8, 24, 40, 56] and [24, 24, 56, 56].
    generator = AnchorGenerator(scales=[2], ratios=[1], base_size=16, stride=16)
    creator = AnchorTargetCreator()
    exact = _sample([[8, 8, 40, 40]])  # equal to an anchor: best IoU 1, one positive
    half = _sample([[8, 8, 40, 24]])  # half of that anchor: best IoU 0.5, positive as the best of its box only
    empty = _sample([])  # no object: no positive
    anchors = generator(4, 4)
    assert coverage.best_anchor_iou(anchors, exact.gt_boxes, exact.image_size).tolist() == [1.0]
    assert coverage.best_anchor_iou(anchors, half.gt_boxes, half.image_size).tolist() == [0.5]
    # the anchor [-8, -8, 24, 24] matches exactly but lies outside: AnchorTargetCreator never uses it
    outside = coverage.best_anchor_iou(anchors, torch.tensor([[-8.0, -8.0, 24.0, 24.0]]), (64, 64))
    assert float(outside) == pytest.approx(256 / 1792)

    result = coverage.anchor_coverage(generator, [exact, half, empty], creator)
    assert (result.num_images, result.num_boxes) == (3, 2)
    assert result.share_iou[0.7] == 0.5 and result.share_iou[0.5] == 1.0
    assert result.median_iou == pytest.approx(0.75)
    assert result.positives == pytest.approx(2 / 3) and result.positives_unsampled == pytest.approx(2 / 3)
    assert result.positives_low_iou == pytest.approx(1 / 3)
    # without a creator: the IoU numbers alone (what anchor=auto needs), at any thresholds
    alone = coverage.anchor_coverage(generator, [exact, half, empty], thresholds=(0.9, 0.5, 0.3))
    assert alone.share_iou == {0.9: 0.5, 0.5: 1.0, 0.3: 1.0} and alone.median_iou == result.median_iou
    assert alone.positives is None and alone.positives_unsampled is None
    with pytest.raises(ValueError, match="no images"):
        coverage.anchor_coverage(generator, [])


def test_positives_before_and_after_sampling_count_ties():
    # a 48 x 48 box in the middle: the four inside anchors tie at IoU 1024 / 2304, all positive
    generator = AnchorGenerator(scales=[2], ratios=[1], base_size=16, stride=16)
    gt = torch.tensor([[8.0, 8.0, 56.0, 56.0]])
    sampled, unsampled, low = coverage.count_positives(AnchorTargetCreator(n_sample=4, pos_ratio=0.5), generator(4, 4), gt, (64, 64))
    assert (sampled, unsampled, low) == (2, 4, 4)


def test_feature_size_is_the_trunks():
    # VGG16's max-pools round down, the tiny trunk's strided convs round up: 300 / 16 = 18.75
    vgg = compose_config(["backbone=vgg16"], Path("/tmp/unused"), pretrained=False)
    assert vgg.backbone.pretrained is False
    tiny = compose_config([], Path("/tmp/unused"), pretrained=False)
    vgg_size, vgg_stride = coverage_report.feature_size_fn(vgg.backbone)
    tiny_size, tiny_stride = coverage_report.feature_size_fn(tiny.backbone)
    assert (vgg_stride, tiny_stride) == (16, 8)  # the default tiny trunk: three stride-2 layers
    assert vgg_size(256, 300) == (16, 18) and tiny_size(256, 300) == (32, 38)


# ---------------------------------------------------------------------------- inspect_shapes
def _line(stdout: str, section: str, stage: str) -> str:
    """The line of ``stage`` in the ``shared``, ``train`` or ``test`` section."""
    shared, rest = stdout.split("Training mode")
    part = {"shared": shared, "train": rest.split("Test mode")[0], "test": rest.split("Test mode")[1]}[section]
    return next(line for line in part.splitlines() if line.strip().startswith(stage))


def _dims(line: str) -> tuple[int, ...]:
    """The shape column of a report line, e.g. ``(1, 4560, 2)`` -> (1, 4560, 2)."""
    return tuple(int(d) for d in re.search(r"\s\(([\d, ]*)\)\s", line).group(1).replace(" ", "").split(",") if d)


def test_inspect_shapes_script(tmp_path, data_dir):
    stdout = run_script("inspect_shapes", [f"paths.data_dir={data_dir}", *SMALL_DATA], tmp_path)
    assert "UNTRAINED" in stdout and "Training mode" in stdout and "Test mode" in stdout
    _, _, h, w = _dims(_line(stdout, "shared", "feature map"))
    a = h * w * 15  # anchor=small: 5 scales x 3 ratios
    assert _dims(_line(stdout, "shared", "RPN scores")) == (1, a, 2) and f"= {a}" in _line(stdout, "shared", "RPN scores")
    assert _dims(_line(stdout, "shared", "RPN deltas")) == (1, a, 4)
    assert _dims(_line(stdout, "shared", "anchors")) == (a, 4)
    assert _dims(_line(stdout, "shared", "RPN 3x3 conv *")) == (1, 128, h, w)  # rpn_mid_channels null: the trunk's 128
    assert _dims(_line(stdout, "shared", "RPN score conv *")) == (1, 30, h, w)
    assert _dims(_line(stdout, "train", "RPN labels")) == (1, a)
    for section in ("train", "test"):
        r = _dims(_line(stdout, section, "class scores"))[0]
        assert _dims(_line(stdout, section, "class scores")) == (r, 7)  # K+1 = 7 shapes classes
        assert _dims(_line(stdout, section, "class-specific deltas")) == (r, 28)
        assert _dims(_line(stdout, section, "RoI pool *")) == (r, 128, 7, 7)
        assert _dims(_line(stdout, section, "head features *")) == (r, 256)
    assert _dims(_line(stdout, "train", "sampled RoIs")) == (128, 4)  # sampler.proposal_target.n_sample
    assert _dims(_line(stdout, "train", "class scores")) == (128, 7)
    proposals = _dims(_line(stdout, "test", "proposals"))[0]
    assert 0 < proposals <= 300  # the testing count
    assert _dims(_line(stdout, "test", "class scores"))[0] == proposals  # all go to the head
    d = _dims(_line(stdout, "test", "final boxes"))[0]
    assert _dims(_line(stdout, "test", "final scores")) == (d,) and _dims(_line(stdout, "test", "final labels")) == (d,)


def _count_calls(monkeypatch, owner, name: str, calls: list) -> None:
    """Record in ``calls`` each call of ``owner.name`` (and what it returned)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(owner, name, wrapper)


def test_shapes_report_reads_one_trace(tmp_path, data_dir, monkeypatch):
    """The report runs the detector once (FasterRCNN.trace: one RPN head, and without a gradient
    one RoI pooling for both branches' RoIs) and shows what that trace keeps."""
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA, "model.rpn_mid_channels=64"], tmp_path, return_hydra_config=True, pretrained=False)
    traces, rpn_calls, pool_calls = [], [], []
    _count_calls(monkeypatch, FasterRCNN, "trace", traces)
    _count_calls(monkeypatch, RPNHead, "forward", rpn_calls)
    _count_calls(monkeypatch, RoIHead, "pool", pool_calls)
    text = shapes_report(cfg, index=2, seed=1)
    (t,) = traces
    assert t.training is not None and t.testing is not None
    assert len(rpn_calls) == 1 and len(pool_calls) == 1  # the training and the test branch's RoIs together
    assert pool_calls[0].shape[0] == t.training.rois.shape[0] + t.testing.rois.shape[0]
    assert _dims(_line(text, "shared", "RPN 3x3 conv *"))[1] == 64
    assert _dims(_line(text, "train", "RPN labels")) == tuple(t.training.anchor_labels.shape)
    assert _dims(_line(text, "train", "sampled RoIs")) == tuple(t.training.rois.shape)
    assert _dims(_line(text, "test", "class-specific boxes")) == tuple(t.testing.boxes.shape)
    assert _dims(_line(text, "test", "final boxes")) == tuple(t.testing.detections[0]["boxes"].shape)
    positives = int((t.training.anchor_labels == 1).sum())
    assert f"AnchorTargetCreator: {positives} positive" in _line(text, "train", "RPN labels")
    loss = float(t.training.losses["loss"])
    assert f"loss {loss:.3f}" in _line(text, "train", "losses")  # the losses of this trace, not of a second run
    monkeypatch.undo()
    assert shapes_report(cfg, index=2, seed=1) == text  # seeded: the same weights and samples


def test_shapes_report_index_out_of_range(tmp_path, data_dir):
    cfg = compose_config([f"paths.data_dir={data_dir}", *SMALL_DATA], tmp_path, return_hydra_config=True, pretrained=False)
    with pytest.raises(ValueError, match="out of range: the train split has 24 images"):
        shapes_report(cfg, index=24)


# ---------------------------------------------------------------------------- check_dataset
def test_check_dataset_script_exit_status(tmp_path, data_dir):
    report = tmp_path / "check.json"
    stdout = run_script("check_dataset", ["--json", str(report), f"paths.data_dir={data_dir}", *SMALL_DATA], tmp_path)
    assert "OK: 0 errors, 0 warnings in 40 samples" in stdout  # 24 train + 8 val + 8 test
    data = json.loads(report.read_text())
    assert data["status"] == 0 and [s["stages"] for s in data["splits"]] == [["train"], ["val"], ["test"]]
    assert [s["samples"] for s in data["splits"]] == [24, 8, 8]
    assert "error:" in run_script("check_dataset", ["data.no_such_key=1", f"paths.data_dir={data_dir}"], tmp_path, status=2)
