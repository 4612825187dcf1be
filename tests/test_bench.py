"""The speed bench (:mod:`fasterrcnn.bench`) measures what it says, and the speed-ups keep the results.

* the bench in a tiny configuration (tiny net, small image, one repeat): every figure of its JSON
  is present and consistent (medians of the recorded runs, ratios of those medians, a stage
  split of the model's own record_function scopes that fits in the profiled step);
* torchvision's twin starts from copies of our weights and gives our proposals and detections;
* every optimised path gives what its reference path gives on a fixed input: NMS that stops at
  the kept count against torchvision's NMS, the detector with it against the detector with
  torchvision's NMS, channels-last against the default layout; bf16 autocast runs.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import nms

import fasterrcnn.creators
from fasterrcnn.bench.accuracy import precision_map
from fasterrcnn.bench.harness import Contender, load_batch
from fasterrcnn.bench.speed import SpeedOptions, run
from fasterrcnn.bench.stages import INFER_STAGES, TRAIN_STAGES, profile_stages
from fasterrcnn.bench.twin import check_anchors, inference_difference, torchvision_twin
from fasterrcnn.boxes import nms_topk
from fasterrcnn.build import build_model, model_config, to_container
from fasterrcnn.lit import FasterRCNNModule

from .conftest import SMALL_DATA, compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
CONTENDERS = {"ours", "torchvision", "torchvision_same"}


# ---------------------------------------------------------------------------- the bench
@pytest.fixture(scope="module")
def bench(tmp_path_factory, data_dir):
    """One tiny bench run with channels-last (so torchvision is also timed with our settings)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    overrides = [*TINY, *SMALL_DATA, f"paths.data_dir={data_dir}", "model.channels_last=true"]
    lines: list[str] = []
    options = SpeedOptions(repeats=2, warmup=0, image_size=[96, 128], data_images=2, out=str(out), busy_steps=2)
    threads = torch.get_num_threads()
    result = run(overrides, options, log=lines.append)
    assert torch.get_num_threads() == threads  # the busy-machine part restores it
    return {"result": result, "json": json.loads(out.read_text()), "log": "\n".join(lines), "options": options}


def test_bench_writes_what_it_returns_and_prints_the_table(bench):
    assert bench["json"] == bench["result"]
    for line in (
        "training step ours / torchvision",
        "inference ours / torchvision",
        "training ours / torchvision, our settings",
        "outside them",
        "images/s delivered",
        "peak RSS growth",
        "busy machine (one competing process): threads=auto",
    ):
        assert line in bench["log"]
    result = bench["result"]
    assert result["config"]["image_size"] == [96, 128]
    assert result["config"]["settings"] == {"channels_last": True, "precision": "32-true"}
    assert result["machine"]["torch_threads"] == torch.get_num_threads() and result["machine"]["load_average_at_start"]


def test_bench_medians_and_ratios_come_from_the_recorded_runs(bench):
    result, repeats = bench["result"], bench["options"].repeats
    for key in ("train", "infer", "train_cpu", "infer_cpu"):
        assert set(result[f"{key}_s"]) == CONTENDERS
        for name in CONTENDERS:
            runs = result[f"{key}_runs_s"][name]
            assert len(runs) == repeats and all(t > 0 for t in runs)
            assert result[f"{key}_s"][name] == statistics.median(runs)
        assert result[f"{key}_ratio"] == pytest.approx(result[f"{key}_s"]["ours"] / result[f"{key}_s"]["torchvision"])
    for key in ("train", "infer"):
        assert result[f"{key}_ratio_same_settings"] == pytest.approx(result[f"{key}_s"]["ours"] / result[f"{key}_s"]["torchvision_same"])


def test_bench_checks_the_twin_against_ours(bench):
    result = bench["result"]
    assert result["anchor_max_abs_diff_px"] <= 1e-3
    twin = result["twin_inference_diff"]
    assert twin["same_counts"] and twin["proposals"] > 0
    assert twin["proposals_px"] <= 1e-3 and twin["boxes_px"] <= 1e-3 and twin["labels_differ"] == 0
    assert len(result["differences"]) == 4


def test_bench_stage_split_is_the_model_scopes_and_fits_in_the_step(bench):
    result = bench["result"]
    split = result["split"]
    assert tuple(split["train_forward"]) == TRAIN_STAGES and tuple(split["infer"]) == INFER_STAGES
    for stages, step in ((split["train_forward"], split["profiled_train_step_s"]), (split["infer"], split["profiled_infer_s"])):
        assert all(t >= 0 for t in stages.values()) and stages["backbone"] > 0
        assert sum(stages.values()) <= step
    assert split["train_forward"]["backbone"] + split["train_forward"]["losses"] <= split["profiled_train_step_s"]
    assert split["infer"]["postprocess"] > 0 and split["train_forward"]["proposal_creator"] > 0
    # with 2 runs the medians of the parts add up to the median step only approximately
    parts = split["forward_s"] + split["backward_s"] + split["optimizer_s"]
    assert parts == pytest.approx(result["train_s"]["ours"], rel=0.5)
    assert sum(split["forward_backward_optimizer_cpu_s"]) == pytest.approx(result["train_cpu_s"]["ours"], rel=0.5)
    isolated = split["isolated"]
    assert 0 < isolated["num_rois"] <= 128  # the sampled RoIs of one image (sampler.proposal_target.n_sample)
    assert all(isolated[k] > 0 for k in ("trunk", "trunk_cpu", "roi_head_layers", "roi_head_layers_cpu"))
    assert 0 < split["trunk_and_head_param_share"] < 1
    expected = result["train_cpu_s"]["ours"] - isolated["trunk_cpu"] - isolated["roi_head_layers_cpu"]
    expected -= split["forward_backward_optimizer_cpu_s"][2] * split["trunk_and_head_param_share"]
    assert split["outside_cpu_s"] == pytest.approx(expected)
    assert split["outside_share"] == pytest.approx(split["outside_cpu_s"] / result["train_cpu_s"]["ours"])


def test_bench_data_and_memory_figures(bench):
    result = bench["result"]
    data = result["data"]
    assert data["images_per_s"] > 0 and data["num_workers"] == 0
    assert data["train_steps_per_s"] == pytest.approx(1 / result["train_s"]["ours"])
    assert data["ratio"] == pytest.approx(data["images_per_s"] / data["train_steps_per_s"])
    assert set(result["memory"]) == CONTENDERS
    for m in result["memory"].values():
        assert m["peak_rss_mib"] >= m["rss_after_build_mib"] > 0
        assert m["peak_growth_mib"] == pytest.approx(m["peak_rss_mib"] - m["rss_after_build_mib"])


def test_bench_busy_machine_figures(bench):
    from fasterrcnn.threads import DEFAULT_THREADS

    busy = bench["result"]["busy"]
    for name in ("idle", "busy", "busy_all_threads"):
        part = busy[name]
        assert len(part["runs_s"]) == 2 and part["step_s"] == statistics.median(part["runs_s"]) > 0
        assert 1 <= part["threads"] <= DEFAULT_THREADS
    assert busy["busy_all_threads"]["threads"] == DEFAULT_THREADS and busy["busy"]["threads"] <= busy["idle"]["threads"]
    assert busy["busy_ratio"] == busy["busy"]["step_s"] / busy["idle"]["step_s"]
    assert busy["unmanaged_ratio"] == busy["busy_all_threads"]["step_s"] / busy["idle"]["step_s"]


def test_busy_machine_kills_its_competing_process(bench_batch):
    from fasterrcnn.bench.busy import busy_machine, competing_process

    started = []

    def compete():
        started.append(competing_process())
        return started[-1]

    model = _tiny_model()
    busy_machine(Contender("ours", model, "ours", bench_batch), steps=1, warmup=0, threads=1, log=lambda _: None, compete=compete)
    assert len(started) == 2 and all(p.poll() is not None for p in started)  # both loaded parts, each stopped after
    with pytest.raises(ValueError, match="steps"):
        busy_machine(Contender("ours", model, "ours", bench_batch), steps=0)


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


def test_bf16_map_scores_a_checkpoint_in_both_precisions(tmp_path, data_dir):
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"paths.data_dir={data_dir}", *TINY, *SMALL_DATA])
    module = FasterRCNNModule(model_config(cfg), optim=to_container(cfg.optim))
    ckpt = tmp_path / "untrained.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": copy.deepcopy(dict(module.hparams))}, ckpt)
    out = precision_map(cfg, str(ckpt), log=lambda msg: None)
    assert set(out) == {"fp32", "bf16"}
    for figures in out.values():
        assert figures["images"] == 8 and figures["seconds_per_image"] > 0 and 0.0 <= figures["map"] <= 1.0
    other = compose_config([f"paths.output_dir={tmp_path}", f"paths.data_dir={data_dir}", *TINY, *SMALL_DATA, "data.classes=[a,b]"])
    with pytest.raises(ValueError, match="the checkpoint detects"):
        precision_map(other, str(ckpt))


# ---------------------------------------------------------------------------- torchvision's twin
def _tiny_model(overrides=()):
    cfg = compose_config(["paths.output_dir=/tmp/unused", *TINY, *overrides])
    torch.manual_seed(0)
    return build_model(model_config(cfg))


def _input():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 160, 224, generator=g)
    return images, [(160, 224)], [(320, 448)]


@pytest.mark.parametrize("overrides", [["model.channels_last=false"], ["model.channels_last=true", "model.roi_pooling=roi_align"]])
def test_twin_gives_our_proposals_and_detections(overrides):
    model = _tiny_model(overrides)
    tv = torchvision_twin(model, channels_last=model.channels_last)
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(1))
    assert check_anchors(model, tv, images) == 0.0
    diff = inference_difference(model, tv, images)
    assert diff["same_counts"] and diff["proposals"] == 2 * model.proposal_creator.n_post_nms["testing"] and diff["detections"] > 0
    assert diff["proposals_px"] <= 1e-4 and diff["boxes_px"] <= 1e-4 and diff["scores"] <= 1e-6 and diff["labels_differ"] == 0


@pytest.fixture(scope="module")
def bench_batch(data_dir):
    """The bench's batch: the first validation image at 96x128."""
    return load_batch(compose_config(["paths.output_dir=/tmp/unused", f"paths.data_dir={data_dir}", *SMALL_DATA]), [96, 128])


def test_twin_trains_copies_of_our_weights(bench_batch):
    model = _tiny_model()
    tv = torchvision_twin(model)
    pairs = [
        (model.trunk, tv.backbone.body),
        (model.rpn, tv.rpn.head.rpn),
        (model.roi_head.head, tv.roi_heads.box_head),
        (model.roi_head.cls_score, tv.roi_heads.box_predictor.cls_score),
        (model.roi_head.bbox_pred, tv.roi_heads.box_predictor.bbox_pred),
    ]
    for ours, theirs in pairs:
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    before = copy.deepcopy(model.state_dict())
    Contender("torchvision", tv, "torchvision", bench_batch).train_step()
    assert not torch.equal(tv.backbone.body[0][0].weight, model.trunk[0][0].weight), "the twin's step changed nothing"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "training the twin changed our weights"


def test_stage_split_rejects_a_model_without_our_scopes(bench_batch):
    model = _tiny_model()
    stages = profile_stages(Contender("ours", model, "ours", bench_batch))
    assert tuple(stages["train"]) == TRAIN_STAGES and sum(stages["train"].values()) <= stages["train_step_s"]
    assert tuple(stages["infer"]) == INFER_STAGES and sum(stages["infer"].values()) <= stages["infer_s"]
    with pytest.raises(RuntimeError, match="no record_function scope backbone"):
        profile_stages(Contender("torchvision", torchvision_twin(model), "torchvision", bench_batch))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_topk_decides_an_iou_at_the_threshold_as_torchvision(dtype):
    """IoUs of exactly 3/10 and 7/10: float32(0.3) is above 0.3 and float32(0.7) below 0.7, so
    torchvision's kernel (a float IoU against the double threshold) suppresses at 0.3 and
    not at 0.7 in float32; nms_topk must decide the same in both dtypes."""
    a, b, c = [0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 7.0, 1.0]  # IoU(a, b) 0.3, IoU(a, c) 0.7
    for other in (b, c):
        boxes, scores = torch.tensor([a, other], dtype=dtype), torch.tensor([1.0, 0.5], dtype=dtype)
        for thresh in (0.3, 0.7):
            assert torch.equal(nms_topk(boxes, scores, thresh, 5), nms(boxes, scores, thresh))
    assert nms(torch.tensor([a, b]), torch.tensor([1.0, 0.5]), 0.3).tolist() == [0]  # the case that needs the rule


def test_nms_topk_empty():
    assert nms_topk(torch.zeros(0, 4), torch.zeros(0), 0.7, 10).shape == (0,)


def test_proposal_creator_takes_nms_topk_for_few_kept_or_many_boxes(monkeypatch):
    """6000 -> 300 (testing), 6000 -> 2000 (recall@2000) and 2000 -> 500 (the default training
    counts) run nms_topk, a few hundred boxes torchvision's kernel; the proposals are the same
    either way."""
    from fasterrcnn.creators import ProposalCreator, nms_topk_is_faster

    assert nms_topk_is_faster(6000, 300) and nms_topk_is_faster(6000, 2000) and nms_topk_is_faster(12000, 2000)
    assert nms_topk_is_faster(2000, 500) and nms_topk_is_faster(3000, 2000)
    assert not nms_topk_is_faster(500, 250) and not nms_topk_is_faster(1000, 500) and nms_topk_is_faster(1000, 100)
    calls = []
    monkeypatch.setattr(fasterrcnn.creators, "nms_topk", lambda *a: calls.append(a[3]) or nms_topk(*a))
    g = torch.Generator().manual_seed(0)
    anchors = _clustered_boxes(6000, g, grid=False)
    deltas, scores = torch.randn(6000, 4, generator=g) * 0.1, torch.rand(6000, generator=g)
    creator = ProposalCreator(n_test_pre_nms=6000, n_test_post_nms=300, min_size=0)
    fast = creator(deltas, scores, anchors, (600, 800), training=False, n_post_nms=2000)
    assert calls == [2000]
    monkeypatch.setattr(fasterrcnn.creators, "nms_topk", lambda boxes, s, thresh, k: nms(boxes, s, thresh)[:k])
    assert torch.equal(fast, creator(deltas, scores, anchors, (600, 800), training=False, n_post_nms=2000))


# ---------------------------------------------------------------------------- the detector: optimised vs reference
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
