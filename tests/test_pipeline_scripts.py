"""The pipeline scripts: scripts/anchor_coverage.py and scripts/inspect_shapes.py.

Each script runs once as a subprocess on the small built-in data; the coverage computation is
also checked on constructed cases where the answer is known.
"""

from __future__ import annotations

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
from fasterrcnn.creators import AnchorTargetCreator

from .conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


coverage = load_script("anchor_coverage")


def run_script(name: str, args: list[str], cwd: Path) -> str:
    """Run a script in a fresh interpreter on one thread; its stdout (fails with its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


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
    assert list(rows) == coverage.anchor_groups()
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
    groups = coverage.anchor_groups()
    assert [g for g in groups if g in ("k3_ratios", "k3_scales", "k9", "k15", "small")] == ["k3_ratios", "k3_scales", "k9", "k15", "small"]
    assert coverage.expand_overrides(["data.num_workers=0"]) == [["data.num_workers=0", f"anchor={g}"] for g in groups]
    assert coverage.expand_overrides(["anchor=k9", "anchor.scales=[4,8,16],[8,16,32]"]) == [
        ["anchor=k9", "anchor.scales=[4,8,16]"],
        ["anchor=k9", "anchor.scales=[8,16,32]"],
    ]
    assert coverage.expand_overrides(["anchor=k9,k15"]) == [["anchor=k9"], ["anchor=k15"]]
    assert coverage.expand_overrides(["anchor.scales=[2,4]"]) == [["anchor.scales=[2,4]"]]  # the default group only
    with pytest.raises(ValueError, match="only anchor"):
        coverage.expand_overrides(["optim.lr=1e-3,1e-2"])


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

    result = coverage.anchor_coverage("test", generator, creator, [exact, half, empty])
    assert (result.k, result.num_images, result.num_boxes) == (1, 3, 2)
    assert result.share_iou[0.7] == 0.5 and result.share_iou[0.5] == 1.0
    assert result.median_iou == pytest.approx(0.75)
    assert result.positives == pytest.approx(2 / 3) and result.positives_unsampled == pytest.approx(2 / 3)
    assert result.positives_low_iou == pytest.approx(1 / 3)


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
    vgg_size, vgg_stride = coverage.feature_size_fn(vgg.backbone)
    tiny_size, tiny_stride = coverage.feature_size_fn(tiny.backbone)
    assert vgg_stride == tiny_stride == 16
    assert vgg_size(256, 300) == (16, 18) and tiny_size(256, 300) == (16, 19)


# ---------------------------------------------------------------------------- inspect_shapes
def _line(stdout: str, section: str, stage: str) -> str:
    """The line of ``stage`` in the ``Training mode`` or ``Test mode`` section."""
    part = stdout.split("Test mode")[section == "test"]
    return next(line for line in part.splitlines() if line.strip().startswith(stage))


def test_inspect_shapes_default(tmp_path, data_dir):
    stdout = run_script("inspect_shapes", [f"paths.data_dir={data_dir}", *SMALL_DATA], tmp_path)
    assert "UNTRAINED" in stdout and "Training mode" in stdout and "Test mode" in stdout
    for section in ("train", "test"):
        h, w = (int(x) for x in re.search(r"\(1, 128, (\d+), (\d+)\)", _line(stdout, section, "feature map")).groups())
        a = h * w * 15  # anchor=small: 5 scales x 3 ratios
        assert f"(1, {a}, 2)" in _line(stdout, section, "RPN scores") and f"= {a}" in _line(stdout, section, "RPN scores")
        assert f"(1, {a}, 4)" in _line(stdout, section, "RPN deltas")
        assert f"({a}, 4)" in _line(stdout, section, "anchors")
        r = int(re.search(r"\((\d+), 7\)", _line(stdout, section, "class scores")).group(1))  # K+1 = 7 shapes classes
        assert f"({r}, 28)" in _line(stdout, section, "class-specific deltas")
        assert f"({r}, 128, 7, 7)" in _line(stdout, section, "RoI pool")
        assert f"({r}, 256)" in _line(stdout, section, "head features")
    assert "(128, 4)" in _line(stdout, "train", "sampled RoIs")  # sampler.proposal_target.n_sample
    assert "(128, 7)" in _line(stdout, "train", "class scores")
    proposals = int(re.search(r"\((\d+), 4\)", _line(stdout, "test", "proposals")).group(1))
    assert 0 < proposals <= 300  # the testing count
    assert re.search(r"\(\d+, 4\)", _line(stdout, "test", "final boxes"))
    assert re.search(r"\(\d+,\)", _line(stdout, "test", "final scores"))
