"""Every config group composes and instantiates, and the paper's numbers are the defaults."""

import pytest
from hydra.utils import instantiate

from fasterrcnn.build import build_model, model_config

from .conftest import compose_config

BASE = ["paths.output_dir=/tmp/unused"]


@pytest.mark.parametrize("name,k", [("k9", 9), ("k15", 15), ("k3_scales", 3), ("k3_ratios", 3), ("small", 15)])
def test_anchor_groups(name, k):
    cfg = compose_config(BASE + [f"anchor={name}"])
    assert instantiate(cfg.anchor)(stride=16).num_anchors == k


def test_anchor_values_are_sweepable_one_by_one():
    cfg = compose_config(BASE + ["anchor.scales=[4,8,16]", "anchor.ratios=[1]"])
    assert instantiate(cfg.anchor)(stride=16).num_anchors == 3


def test_sampler_default_is_the_papers():
    s = compose_config(BASE + ["sampler=default"]).sampler
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
    assert (o.lr, o.momentum, o.weight_decay, o.bias_lr_factor, o.bias_weight_decay) == (1e-3, 0.9, 5e-4, 2.0, 0.0)
    assert (o.lr_decay, list(o.lr_decay_epochs), cfg.trainer.max_epochs) == (0.1, [10], 14)
    m = cfg.model
    assert (m.rpn_mid_channels, m.roi_pooling, m.rpn_sigma, m.roi_sigma, m.nms_thresh, m.score_thresh) == (
        512,
        "roi_pool",
        3.0,
        1.0,
        0.3,
        0.05,
    )
    assert cfg.data.batch_size == 1 and cfg.data.flip_prob == 0.5 and cfg.use_07_metric is True
    # the reference's float-equality tie rule, and its RoI target normalisation
    assert cfg.sampler.anchor_target.best_iou_rtol == 0.0
    assert list(cfg.model.roi_box_coder.std) == [0.1, 0.1, 0.2, 0.2]
    model = build_model(model_config(cfg), pretrained=False)
    assert model.anchor_target_creator.matcher.best_rtol == 0.0 and model.roi_box_coder.std == (0.1, 0.1, 0.2, 0.2)


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


@pytest.mark.parametrize("backbone", ["tiny", "vgg16", "resnet18", "resnet50", "resnet101"])
def test_backbone_groups_build(backbone):
    cfg = compose_config(BASE + [f"backbone={backbone}", "backbone.pretrained=false"] if backbone != "tiny" else BASE)
    model = build_model(model_config(cfg))
    assert model.stride == 16


def test_roi_align_selectable():
    cfg = compose_config(BASE + ["model.roi_pooling=roi_align"])
    assert build_model(model_config(cfg)).roi_head.pooling == "roi_align"


def test_default_run_and_its_way_back_to_the_paper():
    cfg = compose_config(BASE)  # experiment=cpu_shapes
    assert cfg.data.name == "shapes" and cfg.backbone._target_.endswith("tiny")
    assert (cfg.sampler.proposal.n_train_pre_nms, cfg.sampler.proposal.n_train_post_nms) == (2000, 500)
    assert (cfg.sampler.proposal.n_test_pre_nms, cfg.sampler.proposal.n_test_post_nms) == (6000, 300)
    assert cfg.optim.optimizer == "adamw" and list(cfg.anchor.scales) == [1, 2, 4, 8, 16]
    paper = compose_config(BASE + ["anchor=k9", "sampler=default", "optim=sgd"])
    assert (paper.sampler.proposal.n_train_pre_nms, paper.sampler.proposal.n_train_post_nms) == (12000, 2000)
    assert list(paper.anchor.scales) == [8, 16, 32] and paper.optim.optimizer == "sgd"
    # every backbone composes with the default experiment
    assert "widths" not in compose_config(BASE + ["backbone=vgg16"]).backbone


@pytest.mark.parametrize("experiment", ["voc07_vgg16", "voc0712_vgg16", "voc07_resnet101", "cpu_shapes", "cpu_anchor_study"])
def test_experiments_compose_and_build(experiment):
    cfg = compose_config(BASE + [f"experiment={experiment}"])
    model = build_model(model_config(cfg), pretrained=False)
    assert model.stride == 16 and model.num_classes == len(cfg.data.classes)
    if experiment == "voc0712_vgg16":
        assert [s.split for s in cfg.data.train_sets] == ["trainval", "trainval"] and cfg.optim.optimizer == "sgd"
    if experiment == "voc07_resnet101":
        assert cfg.backbone.depth == "resnet101" and cfg.data.name == "voc2007"


@pytest.mark.parametrize("sampler,counts", [("fast", (256, 2000, 500, 128)), ("dense", (512, 12000, 2000, 256))])
def test_sampler_variants_and_single_counts(sampler, counts):
    s = compose_config(BASE + [f"sampler={sampler}"]).sampler
    assert (s.anchor_target.n_sample, s.proposal.n_train_pre_nms, s.proposal.n_train_post_nms, s.proposal_target.n_sample) == counts
    assert (s.proposal.n_test_pre_nms, s.proposal.n_test_post_nms) == (6000, 300)
    model = build_model(model_config(compose_config(BASE + [f"sampler={sampler}", "sampler.proposal_target.pos_ratio=0.5"])))
    assert model.proposal_target_creator.pos_ratio == 0.5
    assert model.anchor_target_creator.n_sample == counts[0]
