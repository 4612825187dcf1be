"""Every config group composes and instantiates; the defaults list is what the default run uses,
and the paper's recipe (``experiment=voc07_vgg16``) keeps the paper's numbers."""

import functools

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import OmegaConf

from fasterrcnn.build import CONF_DIR, build_model, model_config
from fasterrcnn.callbacks import DivergenceWarning, instantiate_callbacks
from fasterrcnn.checkpointing import LastCheckpoint
from fasterrcnn.dashboards import DashboardPanels
from fasterrcnn.metrics_file import MetricsFile
from fasterrcnn.resume import ExactResume

from .conftest import compose_config

BASE = ["paths.output_dir=/tmp/unused"]


# anchor group: k, the smallest and largest anchor side at ratio 1 (px: scale x base_size 16)
@pytest.mark.parametrize("name,k,sizes", [("k9", 9, (128, 512)), ("k15", 15, (64, 1024)), ("k3_scales", 3, (128, 512)), ("k3_ratios", 3, (256, 256)), ("small", 15, (16, 256))])
def test_anchor_groups(name, k, sizes):
    cfg = compose_config(BASE + [f"anchor={name}"])
    anchors = instantiate(cfg.anchor)(stride=16)
    assert anchors.num_anchors == k and anchors.stride == 16
    assert (min(anchors.scales) * anchors.base_size, max(anchors.scales) * anchors.base_size) == sizes


def test_anchor_values_are_sweepable_one_by_one():
    cfg = compose_config(BASE + ["anchor.scales=[4,8,16]", "anchor.ratios=[1]"])
    assert instantiate(cfg.anchor)(stride=16).num_anchors == 3


def test_sampler_default_is_the_papers():
    s = compose_config(BASE + ["sampler=default", "~experiment"]).sampler  # the group, without the default run's values
    assert (s.anchor_target.n_sample, s.anchor_target.pos_ratio) == (256, 0.5)
    assert (s.anchor_target.pos_iou_thresh, s.anchor_target.neg_iou_thresh) == (0.7, 0.3)
    assert (s.proposal.n_train_pre_nms, s.proposal.n_train_post_nms) == (12000, 2000)
    assert (s.proposal.n_test_pre_nms, s.proposal.n_test_post_nms) == (6000, 300)
    assert (s.proposal.nms_thresh, s.proposal.min_size) == (0.7, 16)
    assert (s.proposal_target.n_sample, s.proposal_target.pos_ratio) == (128, 0.25)
    assert (s.proposal_target.pos_iou_thresh, s.proposal_target.neg_iou_thresh_hi) == (0.5, 0.5)
    assert "loc_normalize_std" not in s.proposal_target  # the RoI head's coder, in the model group
    coder = compose_config(BASE).model.roi_box_coder
    assert (list(coder.mean), list(coder.std)) == ([0.0] * 4, [0.1, 0.1, 0.2, 0.2])


def test_paper_recipe_is_reachable_from_config():
    cfg = compose_config(BASE + ["experiment=voc07_vgg16"])
    assert cfg.data.name == "voc2007" and (cfg.data.min_size, cfg.data.max_size) == (600, 1000)
    assert [s.split for s in cfg.data.train_sets] == ["trainval"] and [s.split for s in cfg.data.val_sets] == ["test"]
    assert cfg.backbone._target_.endswith("vgg16") and cfg.backbone.pretrained is True
    assert list(cfg.anchor.scales) == [8, 16, 32] and list(cfg.anchor.ratios) == [0.5, 1, 2]
    o = cfg.optim
    assert OmegaConf.to_container(o.optimizer) == {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "foreach": True}
    assert (o.lr, o.weight_decay, o.bias_lr_factor, o.bias_weight_decay) == (1e-3, 5e-4, 2.0, 0.0)
    assert (o.lr_decay, list(o.lr_decay_epochs), o.warmup_steps, cfg.trainer.max_epochs) == (0.1, [10], 0, 14)
    assert (cfg.model.rpn_mid_channels, cfg.sampler.proposal.n_train_pre_nms) == (512, 12000)  # nothing of cpu_shapes left
    m = cfg.model
    assert (m.rpn_mid_channels, m.roi_pooling, m.rpn_sigma, m.roi_sigma, m.nms_thresh, m.score_thresh) == (
        512,
        "roi_pool",
        3.0,
        1.0,
        0.3,
        0.05,
    )
    assert cfg.data.batch_size == 1 and cfg.use_07_metric is True
    # the paper's flip, drawn from torch's global generator as the reference's, and nothing else
    assert OmegaConf.to_container(cfg.augment) == {**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "augment" / "paper.yaml")), "hflip": 0.5, "rng": "global"}
    assert cfg.data.flip_prob is None and cfg.data.min_size == 600 and cfg.data.test_min_size is None
    # the reference's float-equality tie rule, and its RoI target normalisation
    assert cfg.sampler.anchor_target.best_iou_rtol == 0.0
    assert list(cfg.model.roi_box_coder.std) == [0.1, 0.1, 0.2, 0.2]
    model = build_model(model_config(cfg), pretrained=False)
    assert model.anchor_target_creator.matcher.best_rtol == 0.0 and model.roi_box_coder.std == (0.1, 0.1, 0.2, 0.2)


@pytest.mark.parametrize("experiment", ["voc07_vgg16", "voc0712_vgg16", "voc07_resnet101"])
def test_paper_experiments_pin_the_papers_augmentation(experiment):
    """Whatever train.yaml's default augmentation becomes, the paper's recipes keep augment=paper."""
    assert "override /augment: paper" in (CONF_DIR / "experiment" / "voc07_vgg16.yaml").read_text()
    assert _defaults_list()["augment"] == "robust"  # the default run's, which the paper experiments replace
    cfg = compose_config(BASE + [f"experiment={experiment}"])
    assert (cfg.augment.rng, cfg.augment.hflip, cfg.augment.scale_jitter, cfg.augment.brightness) == ("global", 0.5, None, 0.0)


def test_command_line_group_choice_beats_the_experiment():
    cfg = compose_config(BASE + ["experiment=voc07_vgg16", "anchor=k15"])
    assert list(cfg.anchor.scales) == [4, 8, 16, 32, 64]


@pytest.mark.parametrize("data", ["shapes", "voc2007", "voc2012", "voc0712"])
def test_data_groups_instantiate(data):
    from fasterrcnn.build import build_datamodule

    dm = build_datamodule(compose_config(BASE + [f"data={data}"]))
    assert dm.batch_size == 1
    assert dm.num_classes == (6 if data == "shapes" else 20)
    if data == "voc0712":
        assert len(dm.sets["train"]) == 2
    # the built-in data's decoded samples stay in memory; VOC's (gigabytes) are read each time
    assert dm.cache_mb == (512 if data == "shapes" else 0)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize(
    "backbone,channels,norm",
    [("tiny", 128, ((0.5,) * 3, (0.25,) * 3)), ("vgg16", 512, IMAGENET), ("resnet18", 256, IMAGENET), ("resnet50", 1024, IMAGENET), ("resnet101", 1024, IMAGENET)],
)
def test_backbone_groups_build(backbone, channels, norm):
    cfg = compose_config(BASE + [f"backbone={backbone}", "backbone.pretrained=false"] if backbone != "tiny" else BASE)
    assert (tuple(cfg.data.mean), tuple(cfg.data.std)) == norm  # the DataModule normalises as the backbone expects
    model = build_model(model_config(cfg))
    assert model.stride == (8 if backbone == "tiny" else 16) and model.num_classes == 6 and model.anchor_generator.num_anchors == 15
    # the RPN's 3x3 conv on the trunk's channels (rpn_mid_channels null in the default run: as many)
    assert (model.rpn.conv.in_channels, model.rpn.conv.out_channels) == (channels, channels)


def test_roi_align_selectable():
    cfg = compose_config(BASE + ["model.roi_pooling=roi_align"])
    assert build_model(model_config(cfg)).roi_head.pooling == "roi_align"


def _defaults_list() -> dict[str, str | None]:
    """conf/train.yaml's defaults list as {group: choice}."""
    entries = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    return {k: v for entry in entries if not isinstance(entry, str) for k, v in entry.items()}


def test_the_defaults_list_is_what_the_default_run_uses():
    """The default run's groups are read off train.yaml's defaults list: experiment=cpu_shapes
    changes values only, never a group."""
    defaults = _defaults_list()
    assert {g: defaults[g] for g in ("data", "backbone", "anchor", "sampler", "optim", "callbacks", "augment")} == {
        "data": "shapes",
        "backbone": "tiny",
        "anchor": "small",
        "sampler": "fast",
        "optim": "adamw",
        "callbacks": "default",
        "augment": "robust",
    }
    assert defaults["experiment"] == "cpu_shapes"
    experiment = OmegaConf.load(CONF_DIR / "experiment" / "cpu_shapes.yaml")
    assert "defaults" not in experiment and set(experiment) == {"sampler", "model", "optim", "trainer"}
    # the same groups with and without the experiment: it only sets values
    default, bare = compose_config(BASE), compose_config(BASE + ["~experiment"])
    for group in ("data", "backbone", "anchor", "augment", "callbacks"):
        assert default[group] == bare[group], group
    assert set(default.sampler) == set(bare.sampler) and (default.sampler.proposal.min_size, bare.sampler.proposal.min_size) == (4, 16)
    assert default.optim.optimizer == bare.optim.optimizer


def test_default_run_and_its_way_back_to_the_paper():
    cfg = compose_config(BASE)  # experiment=cpu_shapes
    assert cfg.data.name == "shapes" and cfg.backbone._target_.endswith("tiny")
    assert (cfg.sampler.proposal.n_train_pre_nms, cfg.sampler.proposal.n_train_post_nms) == (2000, 500)
    assert (cfg.sampler.proposal.n_test_pre_nms, cfg.sampler.proposal.n_test_post_nms) == (6000, 300)
    assert list(cfg.anchor.scales) == [1, 2, 4, 8, 16] and list(cfg.anchor.ratios) == [0.5, 1, 2]
    o = cfg.optim
    assert OmegaConf.to_container(o.optimizer) == {"_target_": "torch.optim.AdamW", "_partial_": True, "betas": [0.9, 0.999], "fused": True}
    assert (o.lr, o.weight_decay, o.bias_lr_factor, o.bias_weight_decay) == (1e-3, 1e-4, 1.0, 0.0)
    # what experiment=cpu_shapes sets on top of the groups
    assert (o.warmup_steps, list(o.lr_decay_epochs), o.lr_decay, cfg.trainer.max_epochs) == (200, [4], 0.1, 5)
    assert cfg.model.rpn_mid_channels is None and cfg.model.roi_pooling == "roi_align"
    assert list(cfg.backbone.widths) == [32, 64, 128] and build_model(model_config(cfg), pretrained=False).stride == 8
    assert list(cfg.data.min_size) == [224, 256, 288, 320] and cfg.sampler.proposal.min_size == 4
    assert cfg.augment.stretch == [0.5, 2.0] and cfg.augment.rng == "item" and cfg.augment.mosaic == 1.0
    paper = compose_config(BASE + ["anchor=k9", "sampler=default", "optim=sgd", "model.roi_pooling=roi_pool"])
    assert (paper.sampler.proposal.n_train_pre_nms, paper.sampler.proposal.n_train_post_nms) == (12000, 2000)
    assert list(paper.anchor.scales) == [8, 16, 32] and paper.optim.optimizer._target_ == "torch.optim.SGD"
    assert (paper.optim.optimizer.momentum, paper.optim.weight_decay, paper.optim.bias_lr_factor) == (0.9, 5e-4, 2.0)
    assert (paper.optim.warmup_steps, paper.trainer.max_epochs) == (200, 5)  # the experiment's values stay
    # every backbone composes with the default experiment
    assert "widths" not in compose_config(BASE + ["backbone=vgg16"]).backbone


def test_removing_the_experiment_leaves_the_groups_with_their_own_values():
    """``~experiment`` (Hydra deletes a default so; ``experiment=null`` is refused by Hydra 1.3)."""
    bare = compose_config(BASE + ["~experiment"])
    assert bare.optim.optimizer._target_ == "torch.optim.AdamW" and list(bare.anchor.scales) == [1, 2, 4, 8, 16]
    assert (bare.optim.warmup_steps, list(bare.optim.lr_decay_epochs), bare.trainer.max_epochs) == (0, [10], 14)
    assert bare.model.rpn_mid_channels == 512 and bare.model.roi_pooling == "roi_pool"


def test_callbacks_come_from_their_config_group(tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}", "fault.checkpoint_every_n_steps=7", "evaluation.panel_images=3"])
    callbacks = instantiate_callbacks(cfg.callbacks, runtime={"best_checkpoint": {"monitor": "val/map"}, "metrics_file": {"overrides": ["a=1"]}})
    kinds = {name: type(cb) for name, cb in callbacks.items()}
    assert kinds == {
        "exact_resume": ExactResume,
        "metrics_file": MetricsFile,
        "dashboard": DashboardPanels,
        "divergence": DivergenceWarning,
        "lr_monitor": LearningRateMonitor,
        "best_checkpoint": ModelCheckpoint,
        "last_checkpoint": LastCheckpoint,
    }
    best, last = callbacks["best_checkpoint"], callbacks["last_checkpoint"]
    assert (best.dirpath, best.monitor, best.mode, best.filename) == (str(tmp_path / "checkpoints"), "val/map", "max", "epoch{epoch:03d}-map{val/map:.4f}")
    assert (last.path, last.every_n_steps) == (str(tmp_path / "checkpoints" / "last.ckpt"), 7)
    assert callbacks["metrics_file"].path == str(tmp_path / "metrics.json") and callbacks["metrics_file"].data["overrides"] == ["a=1"]
    assert callbacks["dashboard"].num_images == 3 and callbacks["dashboard"].class_names == list(cfg.data.classes)
    assert callbacks["divergence"].every_n_steps == cfg.trainer.log_every_n_steps
    # null leaves one out; a runtime argument for it is then ignored
    assert "dashboard" not in instantiate_callbacks(compose_config(BASE + ["callbacks.dashboard=null"]).callbacks, runtime={"dashboard": {"x": 1}})


def test_the_optimizer_is_a_partial_target():
    for name, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        make = instantiate(compose_config(BASE + [f"optim={name}"]).optim.optimizer)
        assert isinstance(make, functools.partial) and make.func is cls


# experiment: data, backbone, anchor scales, training proposals, optimiser, epochs (x0.1 after), selection
EXPERIMENTS = {
    "voc07_vgg16": ("voc2007", "vgg16", [8, 16, 32], 12000, "torch.optim.SGD", 14, [10], "none"),
    "voc0712_vgg16": ("voc0712", "vgg16", [8, 16, 32], 12000, "torch.optim.SGD", 14, [10], "none"),
    "voc07_resnet101": ("voc2007", "resnet101", [8, 16, 32], 12000, "torch.optim.SGD", 14, [10], "none"),
    "cpu_shapes": ("shapes", "tiny", [1, 2, 4, 8, 16], 2000, "torch.optim.AdamW", 5, [4], "val"),
    "cpu_anchor_study": ("shapes", "tiny", [1, 2, 4, 8, 16], 2000, "torch.optim.AdamW", 2, [1], "val"),
}


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_experiments_compose_and_build(experiment):
    cfg = compose_config(BASE + [f"experiment={experiment}"])
    data, backbone, scales, pre_nms, optimizer, epochs, decay, selection = EXPERIMENTS[experiment]
    assert cfg.data.name == data and cfg.backbone.get("depth", cfg.backbone._target_).endswith(backbone)
    assert list(cfg.anchor.scales) == scales and cfg.sampler.proposal.n_train_pre_nms == pre_nms
    assert (cfg.optim.optimizer._target_, cfg.trainer.max_epochs, list(cfg.optim.lr_decay_epochs), cfg.selection) == (optimizer, epochs, decay, selection)
    if data == "voc0712":
        assert [s.split for s in cfg.data.train_sets] == ["trainval", "trainval"]
    model = build_model(model_config(cfg), pretrained=False)
    assert model.stride == (8 if backbone == "tiny" else 16) and model.num_classes == len(cfg.data.classes) == (6 if data == "shapes" else 20)


@pytest.mark.parametrize("sampler,counts", [("fast", (256, 2000, 500, 128)), ("dense", (512, 12000, 2000, 256))])
def test_sampler_variants_and_single_counts(sampler, counts):
    s = compose_config(BASE + [f"sampler={sampler}"]).sampler
    assert (s.anchor_target.n_sample, s.proposal.n_train_pre_nms, s.proposal.n_train_post_nms, s.proposal_target.n_sample) == counts
    assert (s.proposal.n_test_pre_nms, s.proposal.n_test_post_nms) == (6000, 300)
    model = build_model(model_config(compose_config(BASE + [f"sampler={sampler}", "sampler.proposal_target.pos_ratio=0.5"])))
    assert model.proposal_target_creator.pos_ratio == 0.5
    assert model.anchor_target_creator.n_sample == counts[0]


def test_own_data_experiment_is_the_default_recipe_with_fitted_anchors_a_holdout_and_a_longer_schedule():
    default = compose_config(BASE)
    cfg = compose_config(BASE + ["experiment=own_data", "data=voc", "data.root=/data/mine", "data.classes=[cell]", "data.min_size=[448,512]"])
    assert cfg.anchor._target_ == "fasterrcnn.analysis.anchor_fit.auto_anchors" and cfg.anchor.k == 15
    assert (cfg.data.val_holdout, cfg.trainer.max_epochs, list(cfg.optim.lr_decay_epochs)) == (0.1, 24, [20])
    assert cfg.data.name == "voc" and list(cfg.data.min_size) == [448, 512]
    for key in ("backbone", "augment", "sampler", "model"):  # the rest is the default run's
        assert cfg[key] == default[key], key
    assert compose_config(BASE + ["experiment=own_data", "data=voc", "data.root=/x", "data.classes=[a]"]).data.min_size == 600  # the data group's
