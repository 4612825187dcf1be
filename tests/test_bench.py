"""scripts/bench.py keeps working, and the speed-ups keep the results.

* bench.py runs in a tiny configuration (tiny net, small image, one repeat) and prints its table
  and writes its JSON;
* every optimised path gives what its reference path gives on a fixed input: NMS that stops at
  the kept count against torchvision's NMS, the detector with it against the detector with
  torchvision's NMS, channels-last against the default layout; bf16 autocast runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import nms

import fasterrcnn.creators
from fasterrcnn.boxes import nms_topk
from fasterrcnn.build import build_model, model_config

from .conftest import SMALL_DATA, compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]


# ---------------------------------------------------------------------------- bench.py
def test_bench_script_prints_ratios_and_writes_json(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    args = [
        *TINY,
        *SMALL_DATA,
        f"paths.data_dir={data_dir}",
        "model.channels_last=true",  # also times torchvision with our settings
        "--image-size", "96", "128",
        "--repeats", "1",
        "--warmup", "0",
        "--data-images", "2",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in (
        "training step ours / torchvision",
        "inference ours / torchvision",
        "training ours / torchvision, our settings",
        "outside them",
        "images/s delivered",
    ):
        assert line in proc.stdout
    result = json.loads(out.read_text())
    assert result["config"]["image_size"] == [96, 128]
    assert result["anchor_max_abs_diff_px"] <= 1e-3
    assert set(result["train_s"]) == {"ours", "torchvision", "torchvision_same"}
    for key in (
        "train_ratio",
        "infer_ratio",
        "train_ratio_same_settings",
        "infer_ratio_same_settings",
    ):
        assert result[key] > 0
    assert set(result["split"]["train_forward"]) >= {
        "backbone",
        "anchor_target_creator",
        "proposal_creator",
        "proposal_target_creator",
        "roi_pool",
        "losses",
    }
    assert result["split"]["train_forward"]["backbone"] > 0 and result["split"]["infer"]["postprocess"] > 0
    assert set(result["memory"]) == {"ours", "torchvision", "torchvision_same"}
    assert all(m["peak_rss_mib"] > 0 for m in result["memory"].values())
    assert result["data"]["images_per_s"] > 0


def test_bench_rejects_unknown_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--repeat", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # not --repeats
    assert proc.returncode != 0 and "--repeat" in proc.stderr


# ---------------------------------------------------------------------------- NMS that stops early
def _clustered_boxes(n: int, generator: torch.Generator, grid: bool) -> torch.Tensor:
    """Boxes around a few centres (heavy overlap, like RPN proposals), optionally on integers
    (exact ties in IoU)."""
    centres = torch.rand(8, 2, generator=generator) * 300
    xy = centres[torch.randint(0, 8, (n,), generator=generator)] + torch.randn(n, 2, generator=generator) * 20
    wh = torch.rand(n, 2, generator=generator) * 80 + 8
    boxes = torch.cat((xy, xy + wh), dim=1)
    return boxes.round() if grid else boxes


@pytest.mark.parametrize("seed", range(6))
def test_nms_topk_equals_torchvision_nms_truncated(seed):
    g = torch.Generator().manual_seed(seed)
    n = [1, 40, 700, 2000, 3000, 500][seed]
    boxes = _clustered_boxes(n, g, grid=seed % 2 == 0)
    scores = torch.rand(n, generator=g) if seed % 3 else torch.randint(0, 4, (n,), generator=g).float()  # ties
    for thresh in (0.3, 0.5, 0.7):
        full = nms(boxes, scores, thresh)
        for k in (1, 17, 300, n + 5):
            for block in (7, 256):
                assert torch.equal(nms_topk(boxes, scores, thresh, k, block=block), full[:k])


def test_nms_topk_empty():
    assert nms_topk(torch.zeros(0, 4), torch.zeros(0), 0.7, 10).shape == (0,)


# ---------------------------------------------------------------------------- the detector: optimised vs reference
def _tiny_model(overrides=()):
    cfg = compose_config(["paths.output_dir=/tmp/unused", *TINY, *overrides])
    torch.manual_seed(0)
    return build_model(model_config(cfg))


def _input():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 160, 224, generator=g)
    return images, [(160, 224)], [(320, 448)]


def _assert_same_detections(a, b, atol=0.0):
    assert len(a) == len(b)
    for da, db in zip(a, b):
        for key in ("boxes", "scores", "labels", "proposals"):
            assert da[key].shape == db[key].shape, key
            torch.testing.assert_close(da[key], db[key], atol=atol, rtol=0.0 if atol == 0.0 else 1e-4)


def test_detections_with_early_stopping_nms_equal_torchvision_nms(monkeypatch):
    model = _tiny_model().eval()
    images, sizes, originals = _input()
    fast = model.predict(images, sizes, originals, score_thresh=0.0, return_proposals=True)
    monkeypatch.setattr(
        fasterrcnn.creators,
        "nms_topk",
        lambda boxes, scores, thresh, k: nms(boxes, scores, thresh)[:k],
    )
    reference = model.predict(images, sizes, originals, score_thresh=0.0, return_proposals=True)
    assert fast[0]["proposals"].shape[0] == model.proposal_creator.n_post_nms["testing"]
    _assert_same_detections(fast, reference)


def test_channels_last_gives_the_same_detections_and_losses():
    reference = _tiny_model(["model.channels_last=false"])
    fast = _tiny_model(["model.channels_last=true"])
    fast.load_state_dict(reference.state_dict())
    assert fast.trunk[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    images, sizes, originals = _input()
    for m in (reference, fast):
        m.eval()
    _assert_same_detections(
        fast.predict(images, sizes, originals, return_proposals=True),
        reference.predict(images, sizes, originals, return_proposals=True),
        atol=1e-3,
    )
    boxes, labels = [torch.tensor([[20.0, 30.0, 90.0, 120.0]])], [torch.tensor([3])]
    torch.manual_seed(5)
    a = reference.losses(images, sizes, sizes, boxes, labels)
    torch.manual_seed(5)
    b = fast.losses(images, sizes, sizes, boxes, labels)
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-4, rtol=1e-4)


def test_bf16_autocast_trains_and_predicts():
    model = _tiny_model()
    images, sizes, originals = _input()
    boxes, labels = [torch.tensor([[20.0, 30.0, 90.0, 120.0]])], [torch.tensor([3])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.losses(images, sizes, sizes, boxes, labels)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.trunk[0][0].weight.grad is not None
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model.predict(images, sizes, originals, score_thresh=0.0, return_proposals=True)
    assert dets[0]["boxes"].dtype == torch.float32 and dets[0]["proposals"].dtype == torch.float32
    assert dets[0]["boxes"].shape[0] > 0
