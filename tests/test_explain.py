"""scripts/explain.py: the pipeline figures, from an untrained model and from a checkpoint."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.build import compose_config
from fasterrcnn.training import train

from .conftest import SMALL_DATA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "explain.py"
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
PANELS = ["1_anchors", "2_anchor_targets", "3_proposals", "4_roi_samples", "5_detections", "pipeline"]


def load_script():
    spec = importlib.util.spec_from_file_location("explain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_checkpoint_model_is_explained(make_cfg, tmp_path, data_dir, capsys):
    few_steps = ["trainer.max_steps=3", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.max_epochs=1"]
    ckpt = train(make_cfg(TINY_NET + few_steps))["checkpoints"]["last"]
    out = tmp_path / "explain_ckpt"
    capsys.readouterr()
    # In-process (the subprocess path is covered above). No TINY_NET: the detector comes from the checkpoint.
    load_script().main(["--ckpt", ckpt, "--out", str(out), "--score", "0.0", "--max-dets", "10", f"paths.data_dir={data_dir}", *SMALL_DATA])
    stdout = capsys.readouterr().out
    assert_pngs(out)
    assert f"checkpoint {ckpt}" in stdout and "UNTRAINED" not in stdout
    detections = counts(stdout, "5 detections")["detections"]
    scores = [float(x) for x in re.findall(r"\w+ (\d\.\d\d)", stdout.split("5 detections:")[1])]
    assert detections > 0 and len(scores) == min(detections, 10)  # the line lists the first 10
    assert scores == sorted(scores, reverse=True)


def test_anchors_of_a_cell_are_centred_on_it():
    explain = load_script()
    gen = AnchorGenerator(scales=[1, 2, 4], ratios=[0.5, 1, 2], stride=16)
    anchors = gen(5, 7)
    i, j = explain.nearest_cell(x=100.0, y=40.0, stride=16, height=5, width=7)
    assert (i, j) == (2, 6)
    cell = explain.anchors_at(anchors, gen.num_anchors, 7, i, j)
    centres = (cell[:, :2] + cell[:, 2:]) / 2
    assert torch.allclose(centres, torch.tensor([(j + 0.5) * 16, (i + 0.5) * 16]).expand_as(centres))
    assert explain.nearest_cell(x=1e4, y=-5.0, stride=16, height=5, width=7) == (0, 6)  # clamped to the map


def test_untrained_backbone_is_never_downloaded(tmp_path):
    explain = load_script()
    cfg = compose_config(["backbone=resnet18"], tmp_path)  # pretrained: true in the config
    model, names = explain.load_model(cfg, None)
    assert names == list(cfg.data.classes) and model.num_classes == len(names)


def test_index_out_of_range_is_an_error(tmp_path, data_dir):
    explain = load_script()
    with pytest.raises(SystemExit, match="out of range"):
        explain.main(["--index", "999", "--out", str(tmp_path), f"paths.data_dir={data_dir}", *SMALL_DATA, *TINY_NET])
