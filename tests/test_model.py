import pytest
import torch

from fasterrcnn.build import build_model, model_config

from .conftest import compose_config


def _model(overrides=()):
    cfg = compose_config(["paths.output_dir=/tmp/unused", *overrides])
    return build_model(model_config(cfg)), cfg


def test_heads_have_the_papers_shapes_and_init():
    model, cfg = _model(["backbone.widths=[8,16,16,32]", "backbone.head_features=64"])
    k = len(cfg.anchor.scales) * len(cfg.anchor.ratios)
    num_classes = len(cfg.data.classes)
    assert model.rpn.score.out_channels == 2 * k and model.rpn.loc.out_channels == 4 * k
    assert model.roi_head.cls_score.out_features == num_classes + 1
    assert model.roi_head.bbox_pred.out_features == 4 * (num_classes + 1)
    assert abs(float(model.rpn.score.weight.detach().std()) - 0.01) < 0.002
    assert abs(float(model.roi_head.bbox_pred.weight.detach().std()) - 0.001) < 0.0002
    assert float(model.roi_head.bbox_pred.bias.abs().sum()) == 0.0


def test_losses_and_predict_shapes():
    model, cfg = _model(["backbone.widths=[8,16,16,32]", "backbone.head_features=64"])
    images = torch.randn(2, 3, 96, 128)
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 50.0]]), torch.zeros(0, 4)]  # the 2nd image has no object
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    out = model.losses(images, [(96, 128), (80, 128)], [(192, 256), (160, 256)], boxes, labels)
    for key in ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss"):
        assert out[key].ndim == 0 and torch.isfinite(out[key])
    out["loss"].backward()
    assert model.rpn.conv.weight.grad is not None and model.roi_head.cls_score.weight.grad is not None
    model.eval()
    dets = model.predict(images, [(96, 128), (80, 128)], [(192, 256), (160, 256)], score_thresh=0.0)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, [(192, 256), (160, 256)]):
        assert det["boxes"].shape[1] == 4 and det["scores"].shape == det["labels"].shape
        assert bool((det["labels"] >= 1).all()) and bool((det["labels"] <= len(cfg.data.classes)).all())
        # original image coordinates: clipped to the original size
        assert float(det["boxes"][:, 2].max()) <= w and float(det["boxes"][:, 3].max()) <= h
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())


def test_a_validation_trace_is_the_training_and_the_testing_trace(monkeypatch):
    """trace(gt, detect=True) (a validation step) takes both proposal counts from one
    ProposalCreator.both per image and gives exactly the training-only and the detection-only
    traces: proposals, sampled RoIs, losses, detections and recall's longer proposal list. Without
    a gradient both branches' RoIs go through the RoI head in one call; with one, the training
    branch's call keeps its graph and the detections have none."""
    model, _ = _model(["backbone.widths=[8,16,16,32]", "backbone.head_features=64", "sampler.proposal.n_train_pre_nms=300", "sampler.proposal.n_train_post_nms=100"])
    model.eval()
    images = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(0))
    sizes, originals = [(160, 224), (144, 224)], [(320, 448), (288, 448)]
    boxes = [torch.tensor([[10.0, 10.0, 90.0, 70.0], [100.0, 40.0, 200.0, 150.0]]), torch.tensor([[30.0, 20.0, 120.0, 100.0]])]
    labels = [torch.tensor([2, 5]), torch.tensor([1])]
    calls = []
    both = model.proposal_creator.both
    monkeypatch.setattr(model.proposal_creator, "both", lambda *a, **k: calls.append(1) or both(*a, **k))
    head_calls = []
    model.roi_head.register_forward_hook(lambda module, args, out: head_calls.append(args[1].shape[0]))
    with torch.no_grad():
        torch.manual_seed(0)
        joint = model.trace(images, sizes, originals, boxes, labels, detect=True, num_proposals=1000)
        assert len(calls) == 2  # one per image
        assert head_calls == [joint.training.rois.shape[0] + joint.testing.rois.shape[0]]  # one RoI head call
        torch.manual_seed(0)
        training = model.trace(images, sizes, originals, boxes, labels).training
        testing = model.trace(images, sizes, originals, detect=True, num_proposals=1000).testing
    assert len(calls) == 2
    assert len(head_calls) == 3
    torch.manual_seed(0)
    with_grad = model.trace(images, sizes, originals, boxes, labels, detect=True, num_proposals=1000)
    assert len(head_calls) == 5  # the branches apart
    assert with_grad.training.losses["loss"].requires_grad and not with_grad.testing.class_logits.requires_grad
    torch.testing.assert_close(with_grad.training.losses["loss"].detach(), training.losses["loss"], rtol=0, atol=0)
    for a, b in zip(joint.training.proposals + joint.testing.proposals, training.proposals + testing.proposals):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ("rois", "roi_labels", "roi_targets"):
        torch.testing.assert_close(getattr(joint.training, name), getattr(training, name), rtol=0, atol=0)
    for key in ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss"):
        torch.testing.assert_close(joint.training.losses[key], training.losses[key], rtol=0, atol=0)
    for a, b in zip(joint.testing.detections, testing.detections):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert joint.training.proposals[0].shape[0] <= 100 < joint.testing.proposals[0].shape[0]


def test_predict_per_class_nms_in_one_call():
    model, _ = _model(["backbone.widths=[8,16,16,32]", "backbone.head_features=64"])
    probs = torch.tensor([[0.1, 0.5, 0.4], [0.1, 0.45, 0.45]])  # 2 RoIs, 2 classes
    boxes = torch.tensor([[0.0, 0, 10, 10]]).repeat(2, 3, 1)  # identical boxes for all classes
    model.num_classes = 2
    out = model.postprocess(probs, boxes, (20, 20), (20, 20), score_thresh=0.05, nms_thresh=0.3)
    # NMS within a class keeps one box per class; the two classes do not suppress each other
    assert sorted(out["labels"].tolist()) == [1, 2]
    assert out["scores"].tolist() == pytest.approx([0.5, 0.45])


def test_vgg16_backbone_structure_and_frozen_blocks():
    from fasterrcnn.backbones import vgg16

    bb = vgg16(pretrained=False, freeze_blocks=2)
    convs = [m for m in bb.trunk if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and bb.out_channels == 512 and bb.stride == 16
    frozen = [not m.weight.requires_grad for m in convs]
    assert frozen == [True] * 4 + [False] * 9  # conv1_1..conv2_2 frozen
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in list(bb.trunk)[-1:])
    out = bb.trunk(torch.zeros(1, 3, 64, 96))
    assert out.shape == (1, 512, 4, 6)
    assert bb.head(torch.zeros(2, 512, 7, 7)).shape == (2, 4096)


def test_resnet_c4_backbone():
    from fasterrcnn.backbones import resnet_c4

    bb = resnet_c4("resnet18", pretrained=False)
    assert bb.trunk(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 4, 4)
    assert bb.head(torch.zeros(2, 256, 14, 14)).shape == (2, 512)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in bb.trunk.modules())


def test_missing_pretrained_weights_give_a_clear_error(tmp_path, monkeypatch):
    import pytest

    from fasterrcnn.backbones import PretrainedWeightsError, vgg16

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(PretrainedWeightsError, match=r"vgg16-397923af\.pth.*backbone\.pretrained=false"):
        vgg16(pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        vgg16(pretrained=True, weights_path=str(tmp_path / "nope.pth"))


def test_a_pretrained_resnet_checkpoint_rebuilds_without_its_imagenet_weights(monkeypatch):
    # FasterRCNNModule.load builds with pretrained=False: the same frozen-BatchNorm network,
    # nothing fetched (before: GroupNorm, and the checkpoint's BatchNorm tensors did not fit).
    import fasterrcnn.backbones as backbones
    from torchvision.ops.misc import FrozenBatchNorm2d

    monkeypatch.setattr(backbones, "load_imagenet_weights", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fetched")))
    cfg = compose_config(["paths.output_dir=/tmp/unused", "backbone=resnet18"])
    model = build_model(model_config(cfg), pretrained=False)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.trunk.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.trunk.modules())
    state = model.state_dict()
    rebuilt = build_model(model_config(cfg), pretrained=False)
    rebuilt.load_state_dict(state)  # strict: the same tensors


def test_tiny_stride_follows_its_widths_and_the_anchors_follow_the_stride():
    from fasterrcnn.backbones import tiny

    for widths, stride in (([8, 16, 16, 32], 16), ([8, 16, 32], 8)):
        bb = tiny(widths, head_features=16)
        assert bb.stride == stride and bb.trunk(torch.zeros(1, 3, 96, 128)).shape == (1, widths[-1], 96 // stride, 128 // stride)
    with pytest.raises(ValueError, match="widths"):
        tiny([8])
    model, _ = _model(["backbone.widths=[8,16,32]", "backbone.head_features=32"])
    assert model.stride == 8 and model.anchor_generator.stride == 8 and model.roi_head.spatial_scale == 1 / 8
    anchors = model.anchor_generator(12, 16)  # one per (cell, base anchor), cell centres every 8 px
    k = len(model.anchor_generator.base)
    centres = (anchors[::k, :2] + anchors[::k, 2:]) / 2
    assert anchors.shape == (12 * 16 * k, 4) and torch.allclose(centres[:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))
    out = model.losses(torch.randn(1, 3, 96, 128), [(96, 128)], [(96, 128)], [torch.tensor([[10.0, 10.0, 30.0, 22.0]])], [torch.tensor([1])])
    assert torch.isfinite(out["loss"])
