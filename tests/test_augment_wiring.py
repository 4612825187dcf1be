"""The augmentation wired into training (``augment=``), multi-scale training with one test size,
the shifted split in validation and evaluation, and ``anchor=auto``.

The augmentation itself (each transform, the box rule) is tests/test_augment.py; the exact
kill-and-resume under ``augment=strong`` is tests/test_faults.py.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from fasterrcnn.analysis.anchor_fit import FIT_KEYS, box_samples, fit_anchors, fit_config, training_boxes
from fasterrcnn.analysis.coverage import anchor_coverage
from fasterrcnn.analysis.coverage_report import feature_size_fn, load_samples
from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.build import build_datamodule, model_config
from fasterrcnn.data.transforms import prepare
from fasterrcnn.evaluate import evaluate
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.predict import predict
from fasterrcnn.resume import ExactResume, ResumableLoader
from fasterrcnn.training import train

from .conftest import SMALL_DATA, compose_config

TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_PROPOSALS = [f"sampler.proposal.n_{s}_{w}_nms={n}" for s in ("train", "test") for w, n in (("pre", 300), ("post", 100))]
K9 = ([8.0, 16.0, 32.0], [0.5, 1.0, 2.0])


def _cfg(tmp_path: Path, data_dir: str, *overrides: str):
    return compose_config([f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *overrides])


def _datamodule(tmp_path, data_dir, *overrides: str):
    dm = build_datamodule(_cfg(tmp_path, data_dir, *overrides))
    dm.setup("fit")
    return dm


def _same(a: dict, b: dict) -> bool:
    return a["image"].shape == b["image"].shape and torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


# ---------------------------------------------------------------------- the draws
def test_strong_items_are_fixed_by_seed_epoch_and_index(tmp_path, data_dir):
    dm = _datamodule(tmp_path, data_dir, "augment=strong")
    train_set = dm.datasets["train"]
    assert train_set.draws_per_item and dm.datasets["val"].augment is None
    assert train_set.cache.max_bytes == dm.datasets["val"].cache.max_bytes == 512 * 2**20  # data.cache_mb of the built-in data
    first = train_set[(1, 5)]
    torch.rand(7)  # whatever the global generator does in between
    again = train_set[(1, 5)]
    assert _same(first, again)
    assert not _same(first, train_set[(2, 5)])  # another epoch, another draw
    other_seed = _datamodule(tmp_path, data_dir, "augment=strong", "seed=1").datasets["train"]
    assert not _same(first, other_seed[(1, 5)])
    # a plain index reads as the dataset's epoch
    train_set.epoch = 1
    assert _same(first, train_set[5])


def _batches(dm, epoch: int, resume_at: tuple[int, int] | None = None) -> list:
    if resume_at is not None:
        position = ExactResume()
        position.load_state_dict({"epoch": resume_at[0], "batch": resume_at[1], "rng": None})
        dm.resume_position = position
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)  # rng: item needs the epoch: always the resumable loader
    out = []
    for e in range(epoch + 1):
        loader.sampler.set_epoch(e)
        batches = list(loader)
        out.append([(b.image_ids, b.images, b.boxes) for b in batches])
    return out


def test_dataloader_workers_see_the_main_process_draws_in_every_epoch(tmp_path, data_dir):
    """num_workers=2 (persistent workers, which never see attributes set after they start)
    gives the batches of num_workers=0, epoch after epoch, and from a resumed position."""
    common = ("augment=strong", "data.min_size=[112,128,144]", "data.max_size=200")
    dm = _datamodule(tmp_path, data_dir, *common)
    main = _batches(dm, epoch=1)
    # each batch holds the (epoch, index) draw of its image
    train_set = dm.datasets["train"]
    for epoch in (0, 1):
        for ids, images, _ in main[epoch][:3]:
            item = train_set[(epoch, train_set.voc.ids.index(ids[0]))]
            assert torch.equal(images[0, :, : item["image"].shape[1], : item["image"].shape[2]], item["image"])
    workers = _batches(_datamodule(tmp_path, data_dir, *common, "data.num_workers=2"), epoch=1)
    assert len(main[0]) == 24
    for epoch_main, epoch_workers in zip(main, workers):
        for (ids_a, img_a, box_a), (ids_b, img_b, box_b) in zip(epoch_main, epoch_workers, strict=True):
            assert ids_a == ids_b and torch.equal(img_a, img_b) and all(torch.equal(x, y) for x, y in zip(box_a, box_b))
    assert not torch.equal(main[0][0][1], main[1][0][1]) or main[0][0][0] != main[1][0][0]
    resumed = _batches(_datamodule(tmp_path, data_dir, *common, "data.num_workers=2"), epoch=0, resume_at=(1, 5))
    for (ids_a, img_a, _), (ids_b, img_b, _) in zip(main[1][5:], resumed[0], strict=True):
        assert ids_a == ids_b and torch.equal(img_a, img_b)


def test_paper_draws_what_the_dataset_drew_before(tmp_path, data_dir):
    """augment=paper: one global torch.rand per item, the flip when it is below 0.5, the same
    pixels and boxes as the former ``prepare(..., flip=torch.rand(()) < flip_prob)``."""
    paper = ("augment=paper", "data.min_size=256")  # the paper's flip at one size (a list draws a size per image)
    dm = _datamodule(tmp_path, data_dir, *paper)
    assert OmegaConf.to_container(_cfg(tmp_path, data_dir, *paper).augment)["rng"] == "global"
    train_set = dm.datasets["train"]
    assert not train_set.draws_per_item and train_set.flip_prob == 0.5
    n = 12
    torch.manual_seed(7)
    ours = [train_set[i] for i in range(n)]
    state = torch.get_rng_state()
    torch.manual_seed(7)
    flips = []
    for i in range(n):
        raw = train_set.voc[i]
        flip = bool(torch.rand(()) < 0.5)
        flips.append(flip)
        image, boxes = prepare(raw["image"], raw["boxes"], train_set.preprocess, flip=flip)
        assert torch.equal(ours[i]["image"], image), i
        assert torch.equal(ours[i]["boxes"], boxes), i  # the reference's resize-then-flip, to the last bit
        # original_*: the image's as read, before the resize (training reads neither)
        assert torch.equal(ours[i]["original_boxes"], raw["boxes"]) and ours[i]["original_size"] == tuple(raw["image"].shape[-2:])
    assert torch.equal(torch.get_rng_state(), state) and 0 < sum(flips) < n  # as many draws, some flips
    # the default run's loader is the plain DataLoader, its order unchanged; under exact resume
    # the order is DistributedSampler's of seed + epoch, as before, now with the epoch
    assert not isinstance(dm.train_dataloader(), ResumableLoader)
    dm.resume_position = ExactResume()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    reference = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=0)
    reference.set_epoch(2)
    assert list(loader.sampler) == [(2, i) for i in reference]


def test_data_flip_prob_is_deprecated_for_augment_hflip(tmp_path, data_dir):
    with pytest.warns(FutureWarning, match="data.flip_prob is deprecated.*augment.hflip"):
        dm = _datamodule(tmp_path, data_dir, "augment=strong", "data.flip_prob=0")
    assert dm.datasets["train"].flip_prob == 0.0 and dm.augment.rng == "item" and dm.augment.cuts_boxes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _datamodule(tmp_path, data_dir).datasets["train"].flip_prob == 0.5  # the config no longer sets it


# ---------------------------------------------------------------------- multi-scale
def test_multi_scale_training_and_one_test_size(tmp_path, data_dir):
    sizes = [160, 192, 224]
    dm = _datamodule(tmp_path, data_dir, f"data.min_size=[{','.join(map(str, sizes))}]", "data.max_size=1000", "augment=light")
    drawn = {min(dm.datasets["train"][(epoch, i)]["image"].shape[-2:]) for epoch in range(2) for i in range(12)}
    assert drawn == set(sizes)
    assert {min(dm.datasets["val"][i]["image"].shape[-2:]) for i in range(4)} == {224}  # validation at the test size
    cfg = _cfg(tmp_path, data_dir, "data.min_size=[160,192,224]", "data.max_size=1000")
    assert model_config(cfg)["preprocess"]["min_size"] == 224
    cfg = _cfg(tmp_path, data_dir, "data.min_size=[160,192,224]", "data.max_size=1000", "data.test_min_size=192")
    assert model_config(cfg)["preprocess"]["min_size"] == 192
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert min(dm.datasets["val"][0]["image"].shape[-2:]) == 192
    with pytest.raises(Exception, match="data.test_min_size is one positive size"):  # Hydra wraps the ValueError
        build_datamodule(_cfg(tmp_path, data_dir, "data.test_min_size=[192]"))


# ---------------------------------------------------------------------- anchor=auto
@pytest.fixture(scope="module")
def shapes_samples(tmp_path_factory, data_dir):
    """The built-in training boxes at the default run's resolution, with the tiny trunk's sizes."""
    cfg = compose_config([f"paths.output_dir={tmp_path_factory.mktemp('fit')}", f"paths.data_dir={data_dir}", *SMALL_DATA, "data.builtin.num_train=64", "data.min_size=256"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    feature_size, stride = feature_size_fn(cfg.backbone)
    boxes = training_boxes(dm.datasets["train"].voc, 256, 400)
    return cfg, box_samples(boxes, feature_size), stride, feature_size, boxes


def test_training_boxes_are_the_boxes_training_sees(shapes_samples):
    """Read from the annotations alone, the boxes and sizes of the decoded, resized images."""
    cfg, samples, _, feature_size, _ = shapes_samples
    decoded = load_samples(cfg, 10, feature_size)
    for ours, theirs in zip(samples, decoded, strict=False):
        assert ours.image_size == tuple(theirs.image_size) and ours.feature_size == theirs.feature_size
        torch.testing.assert_close(ours.gt_boxes, theirs.gt_boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("k", [9, 15])
def test_fit_beats_k9_respects_k_and_is_deterministic(shapes_samples, k):
    _, samples, stride, _, _ = shapes_samples
    fit = fit_anchors(samples, k, base_size=16, stride=stride, start=K9)
    assert len(fit.scales) * len(fit.ratios) == k
    k9 = anchor_coverage(AnchorGenerator(*K9, 16, stride), samples)
    assert fit.before.share_iou == k9.share_iou  # "before" is the config's values, by the same function
    assert fit.coverage.share_iou[0.5] > k9.share_iou[0.5] + 0.2 and fit.coverage.share_iou[0.7] > k9.share_iou[0.7]
    # the fitted anchors score what the one coverage function says
    assert anchor_coverage(AnchorGenerator(fit.scales, fit.ratios, 16, stride), samples).share_iou == fit.coverage.share_iou
    again = fit_anchors(samples, k, base_size=16, stride=stride, start=K9)
    assert (again.scales, again.ratios) == (fit.scales, fit.ratios)
    if k == 15:  # also above the default run's hand-made anchors (small: 16-256 px)
        small = anchor_coverage(AnchorGenerator([1, 2, 4, 8, 16], [0.5, 1, 2], 16, stride), samples)
        assert fit.coverage.share_iou[0.5] > small.share_iou[0.5]


def test_fit_works_at_other_strides_and_refuses_bad_k(shapes_samples):
    *_, boxes = shapes_samples
    for stride in (8, 32):  # a trunk of that stride: feature maps of ceil(size / stride)
        samples = box_samples(boxes, lambda h, w, s=stride: (math.ceil(h / s), math.ceil(w / s)))
        fit = fit_anchors(samples, 6, base_size=16, stride=stride, start=K9)
        assert len(fit.scales) * len(fit.ratios) == 6 and fit.coverage.share_iou[0.5] > fit.before.share_iou[0.5]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="anchor.k"):
            fit_anchors(samples, bad)


def test_unfitted_auto_anchors_are_their_starting_values_and_sweep_values_compose(tmp_path, data_dir):
    for k in (9, 15):  # -m anchor=auto anchor.k=9,15: each job's config
        cfg = _cfg(tmp_path, data_dir, "anchor=auto", f"anchor.k={k}")
        assert cfg.anchor.k == k
        with pytest.warns(UserWarning, match="anchor=auto is fitted by train"):
            anchor = model_config(cfg)["anchor"]  # a tool's model: the starting values (k9's)
        assert anchor == {"_target_": "fasterrcnn.anchors.AnchorGenerator", "_partial_": True, "base_size": 16, "scales": K9[0], "ratios": K9[1]}
        assert instantiate(cfg.anchor)(stride=16).num_anchors == 9  # what scripts/anchor_coverage.py builds
    with pytest.raises(Exception, match="anchor.k is the number of anchors"):
        instantiate(_cfg(tmp_path, data_dir, "anchor=auto", "anchor.k=0").anchor)(stride=16)
    assert fit_config(_cfg(tmp_path, data_dir, "anchor=k9"), None) is None  # not auto: untouched


# ---------------------------------------------------------------------- one run with all of it
@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, data_dir):
    """augment=strong, multi-scale, anchor=auto (k=6), the shifted split validated: a few steps."""
    out = tmp_path_factory.mktemp("auto")
    cfg = compose_config(
        [f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=csv", *SMALL_DATA, *TINY_NET, *FEW_PROPOSALS,
         "augment=strong", "data.min_size=[128,160]", "data.max_size=240", "anchor=auto", "anchor.k=6", "data.val_shift=true",
         "trainer.max_steps=4", "trainer.max_epochs=1", "trainer.limit_val_batches=3", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "evaluation.coco=false"]
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["status"] == "completed"
    return {"out": out, "metrics": metrics, "ckpt": metrics["checkpoints"]["last"], "data_dir": data_dir}


def test_the_fitted_anchors_are_in_config_yaml_and_the_checkpoint(auto_run):
    fit = auto_run["metrics"]["anchor_fit"]
    assert fit["k"] == 6 and len(fit["scales"]) * len(fit["ratios"]) == 6
    assert fit["coverage"]["iou>=0.5"] > fit["before"]["coverage"]["iou>=0.5"] and fit["before"]["scales"] == K9[0]
    saved = OmegaConf.load(auto_run["out"] / "config.yaml").anchor
    assert not set(FIT_KEYS) & set(saved) and saved._target_ == "fasterrcnn.anchors.AnchorGenerator" and (list(saved.scales), list(saved.ratios)) == (fit["scales"], fit["ratios"])
    hparams = torch.load(auto_run["ckpt"], map_location="cpu", weights_only=True)["hyper_parameters"]
    anchor = hparams["model_cfg"]["anchor"]
    assert (anchor["scales"], anchor["ratios"]) == (fit["scales"], fit["ratios"]) and "k" not in anchor
    assert hparams["model_cfg"]["preprocess"]["min_size"] == 160  # the largest training size
    module = FasterRCNNModule.load(auto_run["ckpt"])
    assert module.model.anchor_generator.scales == tuple(fit["scales"]) and module.model.anchor_generator.num_anchors == 6


def test_val_shift_is_logged_beside_val_and_selection_stays_on_val(auto_run):
    rows = list(csv.DictReader((auto_run["out"] / "csv" / "metrics.csv").open()))
    keys = {k for row in rows for k, v in row.items() if v}
    assert {"val/map", "val_shift/map", "val_shift/loss", "val_shift/recall/300@0.5", "val_shift/num_images"} <= keys
    assert not any("dataloader_idx" in k for k in keys)
    shift_images = [float(r["val_shift/num_images"]) for r in rows if r.get("val_shift/num_images")]
    assert shift_images and shift_images[-1] == 3  # limit_val_batches of the 8 shifted images
    assert auto_run["metrics"]["monitor"] == "val/map"
    final = auto_run["metrics"]["final"]  # metrics.json keeps the shifted numbers beside val/ (sweep_report reads them)
    assert "val/map" in final and "val_shift/map" in final and final["val_shift/num_images"] == 3


def test_eval_and_predict_from_the_fitted_checkpoint(auto_run, tmp_path):
    base = [f"ckpt_path={auto_run['ckpt']}", f"paths.data_dir={auto_run['data_dir']}", *SMALL_DATA, "coco=false"]
    shifted = evaluate(compose_config([*base, f"paths.output_dir={tmp_path / 'shift'}", "split=test_shift"], config_name="eval"))
    assert shifted["split"] == "test_shift" and shifted["image_set"] == "test_shift" and shifted["num_images"] == 8
    assert "test_shift/map" in shifted["metrics"]
    saved = OmegaConf.load(tmp_path / "shift" / "config.yaml")
    assert (saved.data.min_size, saved.data.test_min_size) == (160, None)  # the checkpoint's test size
    test = evaluate(compose_config([*base, f"paths.output_dir={tmp_path / 'test'}"], config_name="eval"))
    assert test["num_images"] == 8 and test["split"] == "test"
    image = sorted(Path(auto_run["data_dir"]).glob("shapes-*/JPEGImages/*.jpg"))[0]
    out = predict(compose_config([f"ckpt_path={auto_run['ckpt']}", f"input={image}", f"output={tmp_path / 'pred'}"], config_name="predict"))
    assert out["min_size"] == 160 and out["failures"] == []
    with pytest.raises(Exception, match="no test_shift split"):
        evaluate(compose_config([*base, f"paths.output_dir={tmp_path / 'voc'}", "split=test_shift", "data.shift_sets=[]"], config_name="eval"))


def test_a_resumed_auto_run_takes_the_checkpoint_anchors(auto_run, tmp_path, data_dir, monkeypatch):
    import fasterrcnn.analysis.anchor_fit as anchor_fit

    def no_refit(*args, **kwargs):
        raise AssertionError("a resumed run must not fit again")

    monkeypatch.setattr(anchor_fit, "fit_anchors", no_refit)
    cfg = _cfg(tmp_path, data_dir, "anchor=auto", "anchor.k=15")  # whatever k says now
    record = fit_config(cfg, None, auto_run["ckpt"])
    assert record["resumed"] and list(cfg.anchor.scales) == auto_run["metrics"]["anchor_fit"]["scales"] and "k" not in cfg.anchor
    assert model_config(cfg)["anchor"]["ratios"] == auto_run["metrics"]["anchor_fit"]["ratios"]
    json.dumps(record)  # plain data for metrics.json
