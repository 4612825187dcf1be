import math

import pytest
import torch
from torchvision.ops import box_iou

from fasterrcnn.anchors import AnchorGenerator, grid_anchors
from fasterrcnn.boxes import BoxCoder, inside_image
from fasterrcnn.creators import AnchorTargetCreator, ProposalCreator, ProposalTargetCreator, _rank, smallest, subsample_labels
from fasterrcnn.matcher import BEST_IOU_RTOL


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- sampling
def test_subsample_labels_caps_positives_and_fills_with_negatives():
    labels = torch.tensor([1] * 200 + [0] * 1000 + [-1] * 50)
    for _ in range(5):
        out = subsample_labels(labels, num_samples=256, positive_fraction=0.5)
        assert int((out == 1).sum()) == 128
        assert int((out == 0).sum()) == 128
        assert bool(((out == 1) <= (labels == 1)).all()) and bool(((out == 0) <= (labels == 0)).all())


def test_subsample_labels_few_positives_more_negatives():
    labels = torch.tensor([1] * 10 + [0] * 1000)
    out = subsample_labels(labels, num_samples=256, positive_fraction=0.5)
    assert int((out == 1).sum()) == 10
    assert int((out == 0).sum()) == 246


def test_smallest_is_the_rank_rule():
    """topk on the CPU keeps the same keys as ranking them all (the rule every device uses)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randperm(30000, generator=g).float() / 30000  # distinct keys
    for k in (0, 1, 255, 29999, 30000, 40000, torch.tensor(128)):
        assert torch.equal(smallest(keys, k), _rank(keys) < k), k
    assert smallest(keys, 300).sum() == 300


def test_subsample_labels_is_uniform_over_positives():
    labels = torch.tensor([1] * 4 + [0] * 10)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts += (subsample_labels(labels, num_samples=4, positive_fraction=0.5)[:4] == 1).float()
    # each positive is kept with probability 2/4
    assert torch.allclose(counts / 2000, torch.full((4,), 0.5), atol=0.05)


# ----------------------------------------------------------------------------- AnchorTargetCreator
def test_anchor_target_only_inside_anchors_are_labelled():
    anchors = _boxes([0, 0, 10, 10], [-1, 0, 9, 10], [90, 90, 101, 100], [20, 20, 30, 30])
    gt = _boxes([0, 0, 10, 10])
    labels, _ = AnchorTargetCreator(n_sample=256)(anchors, gt, (100, 100))
    assert labels.tolist() == [1, -1, -1, 0]


def test_anchor_target_thresholds_and_ties():
    gt = _boxes([0, 0, 10, 10], [50, 50, 60, 60])
    anchors = _boxes(
        [0, 0, 10, 10],  # IoU 1 with gt0 -> positive
        [0, 0, 10, 12],  # IoU 10/12 = 0.83 >= 0.7 -> positive
        [0, 0, 10, 20],  # IoU 0.5: neither -> ignored
        [0, 0, 30, 30],  # IoU 0.11 < 0.3 -> negative
        [50, 50, 60, 70],  # IoU 0.5 with gt1, the best for gt1 (tie) -> positive
        [50, 40, 60, 60],  # IoU 0.5 with gt1, also best (tie) -> positive
        [70, 70, 80, 80],  # IoU 0 -> negative
    )
    labels, deltas = AnchorTargetCreator(n_sample=256)(anchors, gt, (100, 100))
    assert labels.tolist() == [1, 1, -1, 0, 1, 1, 0]
    # regression targets for positives, zero elsewhere
    expected = BoxCoder().encode(anchors[[0, 1, 4, 5]], gt[[0, 0, 1, 1]])
    torch.testing.assert_close(deltas[[0, 1, 4, 5]], expected)
    assert bool((deltas[[2, 3, 6]] == 0).all())


def test_anchor_target_no_object_image_gives_only_negatives():
    anchors = _boxes(*[[i, i, i + 10, i + 10] for i in range(0, 80, 2)])
    labels, deltas = AnchorTargetCreator(n_sample=16)(anchors, torch.zeros(0, 4), (100, 100))
    assert int((labels == 1).sum()) == 0
    assert int((labels == 0).sum()) == 16
    assert bool((deltas == 0).all())


def test_anchor_target_sample_caps():
    # 300 anchors identical to the gt (all positive) and 700 far away (negative)
    anchors = torch.cat((_boxes([10, 10, 40, 40]).repeat(300, 1), _boxes([60, 60, 90, 90]).repeat(700, 1)))
    labels, _ = AnchorTargetCreator(n_sample=256, pos_ratio=0.5)(anchors, _boxes([10, 10, 40, 40]), (100, 100))
    assert int((labels == 1).sum()) == 128
    assert int((labels == 0).sum()) == 128


def test_anchor_target_gt_without_inside_overlap_claims_nothing():
    anchors = _boxes([0, 0, 10, 10], [20, 20, 30, 30])
    labels, _ = AnchorTargetCreator()(anchors, _boxes([60, 60, 70, 70]), (100, 100))
    assert labels.tolist() == [0, 0]


# ----------------------------------------------------------------------------- ProposalCreator
def test_proposal_creator_counts_min_size_and_nms():
    creator = ProposalCreator(nms_thresh=0.7, n_train_pre_nms=4, n_train_post_nms=2, n_test_pre_nms=5, n_test_post_nms=3, min_size=16)
    anchors = _boxes(
        [0, 0, 40, 40],  # score .9
        [1, 1, 41, 41],  # .8, IoU .9 with the first -> suppressed by NMS
        [50, 50, 90, 90],  # .7
        [0, 50, 40, 90],  # .6
        [50, 0, 90, 40],  # .5
        [0, 0, 10, 10],  # .95 but 10 px < 16 -> dropped
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.95])
    deltas = torch.zeros(6, 4)
    train = creator(deltas, scores, anchors, (100, 100), scale=1.0, training=True)
    torch.testing.assert_close(train, anchors[[0, 2]])  # top 4 -> NMS drops #1 -> keep 2
    test = creator(deltas, scores, anchors, (100, 100), scale=1.0, training=False)
    torch.testing.assert_close(test, anchors[[0, 2, 3]])
    # at scale 0.5, min_size is 8 px in the resized image: the 10 px box survives
    half = creator(deltas, scores, anchors, (100, 100), scale=0.5, training=False)
    torch.testing.assert_close(half[0], anchors[5])


def test_proposal_creator_decodes_and_clips():
    creator = ProposalCreator(min_size=1)
    anchors = _boxes([80, 80, 120, 120])
    out = creator(torch.tensor([[0.25, 0.0, 0.0, 0.0]]), torch.tensor([0.9]), anchors, (100, 100), training=False)
    torch.testing.assert_close(out, _boxes([90, 80, 100, 100]))


def test_proposals_carry_no_gradient():
    deltas = torch.zeros(3, 4, requires_grad=True)
    scores = torch.tensor([0.3, 0.2, 0.1], requires_grad=True)
    out = ProposalCreator(min_size=1)(deltas, scores, _boxes([0, 0, 20, 20], [30, 30, 60, 60], [5, 60, 40, 90]), (100, 100))
    assert not out.requires_grad


def _crowded_rpn(n=3000, seed=0, ties=False):
    """RPN outputs whose boxes crowd around a few objects (a trained RPN's), as anchors, zero
    deltas and scores; ``ties``: scores rounded to 1/64, so many are equal."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=g) * 300
    pick = torch.randint(12, (n,), generator=g)
    xy = centres[pick] + torch.randn(n, 2, generator=g) * 6
    wh = 20 + torch.rand(n, 2, generator=g) * 40
    anchors = torch.cat((xy, xy + wh), dim=1)
    scores = torch.rand(n, generator=g)
    if ties:
        scores = (scores * 64).round() / 64
    return torch.zeros(n, 4), scores, anchors


class _CountingNMS:
    def __init__(self, monkeypatch):
        import fasterrcnn.creators as creators

        self.calls = 0
        for name in ("nms", "nms_topk"):
            original = getattr(creators, name)
            monkeypatch.setattr(creators, name, self._counted(original))

    def _counted(self, fn):
        def call(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return call


@pytest.mark.parametrize(
    "counts,ties,shared",
    [
        ((600, 150, 2000, 300), False, True),  # the CPU default's shape: training the smaller count, from the testing NMS
        ((600, 150, 2000, 1000), False, True),  # ... with proposals for recall
        ((600, 150, 2000, 10), False, False),  # the testing NMS stops before deciding 150 training boxes: their own NMS
        ((2500, 300, 2000, 300), False, False),  # the paper's shape (12000 -> 2000 above 6000 -> 300): their own
        ((600, 150, 2000, 300), True, None),  # tied scores: shared only where the two top-k orders agree
    ],
)
def test_proposal_creator_both_is_the_two_calls(monkeypatch, counts, ties, shared):
    """ProposalCreator.both (a validation step's training and testing proposals) gives exactly
    the two separate calls' boxes, with one NMS instead of two where the training boxes can be
    read off the testing NMS."""
    n_train_pre, n_train_post, n_test_pre, n_test_post = counts
    creator = ProposalCreator(n_train_pre_nms=n_train_pre, n_train_post_nms=n_train_post, n_test_pre_nms=n_test_pre, n_test_post_nms=n_test_post, min_size=4)
    for seed in range(4):
        deltas, scores, anchors = _crowded_rpn(seed=seed, ties=ties)
        train = creator(deltas, scores, anchors, (360, 360), training=True)
        test = creator(deltas, scores, anchors, (360, 360), training=False)
        counter = _CountingNMS(monkeypatch)
        pair = creator.both(deltas, scores, anchors, (360, 360))
        torch.testing.assert_close(pair[0], train, rtol=0, atol=0)
        torch.testing.assert_close(pair[1], test, rtol=0, atol=0)
        assert pair[0].shape[0] == min(n_train_post, train.shape[0]) and pair[1].shape[0] <= n_test_post
        if shared is not None:
            assert counter.calls == (1 if shared else 2)
        monkeypatch.undo()
    # recall's longer testing list: the first n_test_post are the testing proposals
    longer = creator.both(deltas, scores, anchors, (360, 360), n_test_post_nms=2 * n_test_post)
    torch.testing.assert_close(longer[1], creator(deltas, scores, anchors, (360, 360), training=False, n_post_nms=2 * n_test_post), rtol=0, atol=0)
    torch.testing.assert_close(longer[0], train, rtol=0, atol=0)
    # no box left after the size rule
    empty = creator.both(deltas, scores, anchors * 0.01, (360, 360))
    assert empty[0].shape == empty[1].shape == (0, 4)


# ----------------------------------------------------------------------------- ProposalTargetCreator
def _many_rois(gt, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 150
    wh = 10 + torch.rand(n, 2, generator=g) * 80
    rois = torch.cat((xy, xy + wh), dim=1)
    # and some near-copies of the ground truth
    jitter = gt.repeat(60, 1) + torch.randn(60 * gt.shape[0], 4, generator=g) * 2
    return torch.cat((rois, jitter))


def test_proposal_target_fractions_and_labels():
    gt = _boxes([10, 10, 60, 60], [100, 100, 180, 150])
    gt_labels = torch.tensor([3, 7])
    rois = _many_rois(gt)
    creator = ProposalTargetCreator()
    sample_rois, labels, deltas = creator(rois, gt, gt_labels)
    assert sample_rois.shape == (128, 4) and labels.shape == (128,) and deltas.shape == (128, 4)
    fg = labels >= 1
    assert int(fg.sum()) == 32  # 25% of 128
    assert int((labels == 0).sum()) == 96
    iou = box_iou(sample_rois, gt)
    max_iou, matched = iou.max(1)
    assert bool((max_iou[fg] >= 0.5).all()) and bool((max_iou[~fg] < 0.5).all())
    torch.testing.assert_close(labels[fg], gt_labels[matched[fg]])


def test_proposal_target_matches_and_the_roi_coder_normalises_by_std():
    gt = _boxes([10, 10, 60, 60])
    rois, labels, matched = ProposalTargetCreator()(_many_rois(gt), gt, torch.tensor([1]))
    fg = labels >= 1
    assert bool(fg.any()) and bool((matched[fg] == gt).all())  # foreground RoIs carry their ground truth
    # the RoI head's coder (model.roi_box_coder, the paper's std) makes the targets
    coder = BoxCoder(std=(0.1, 0.1, 0.2, 0.2))
    raw = BoxCoder().encode(rois[fg], gt.expand(int(fg.sum()), 4))
    torch.testing.assert_close(coder.encode(rois[fg], matched[fg]), raw / torch.tensor([0.1, 0.1, 0.2, 0.2]))


def test_model_roi_targets_are_the_coders_and_zero_off_foreground():
    from fasterrcnn.build import build_model, model_config

    from .conftest import compose_config

    model = build_model(model_config(compose_config(["paths.output_dir=/tmp/unused", "backbone.widths=[8,16,16,32]", "backbone.head_features=32"])))
    assert model.roi_box_coder.std == (0.1, 0.1, 0.2, 0.2) and model.roi_box_coder.mean == (0.0,) * 4
    gt = [_boxes([10, 10, 60, 60])]
    torch.manual_seed(0)
    stages = model.trace(torch.randn(1, 3, 96, 128), [(96, 128)], [(96, 128)], gt, [torch.tensor([1])]).training
    fg = stages.roi_labels >= 1
    assert bool(fg.any())
    expected = model.roi_box_coder.encode(stages.rois[fg], gt[0].expand(int(fg.sum()), 4))
    torch.testing.assert_close(stages.roi_targets[fg], expected)
    assert bool((stages.roi_targets[~fg] == 0).all())


def test_proposal_target_adds_ground_truth_and_respects_lower_bound():
    gt = _boxes([10, 10, 60, 60])
    far = _boxes([100, 100, 150, 150], [120, 0, 160, 40])  # IoU 0 with the gt
    near = _boxes([10, 10, 60, 120])  # IoU ~0.45: background in [0.1, 0.5)
    creator = ProposalTargetCreator(neg_iou_thresh_lo=0.1)
    rois, labels, _ = creator(torch.cat((far, near)), gt, torch.tensor([2]))
    valid = labels >= 0
    # the gt itself is foreground; the IoU-0 RoIs are below the 0.1 lower bound: not sampled
    assert sorted(labels[valid].tolist()) == [0, 2]
    assert rois.shape[0] == 4  # min(n_sample, R + G); the rest is ignored filler


def test_proposal_target_no_objects():
    rois = _boxes([0, 0, 10, 10], [5, 5, 30, 30])
    sample_rois, labels, matched = ProposalTargetCreator()(rois, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert labels.tolist() == [0, 0]
    assert bool((matched == sample_rois).all())  # no ground truth: each RoI stands for itself (no target)


# ----------------------------------------------------------------------------- ties of equal geometry
def _anchors64(generator: AnchorGenerator, height: int, width: int) -> torch.Tensor:
    """The same anchors computed in float64 from their exact sides: IoUs of equal geometry agree
    to ~1e-16 there, while the float32 anchors' rounding splits them in the last bits."""
    rows = []
    for r in generator.ratios:
        for s in generator.scales:
            h, w = generator.base_size * s * math.sqrt(r), generator.base_size * s * math.sqrt(1.0 / r)
            rows.append((-w / 2, -h / 2, w / 2, h / 2))
    return grid_anchors(torch.tensor(rows, dtype=torch.float64), height, width, generator.stride)


@pytest.mark.parametrize(
    "gt, tied, kept_by_equality",
    [
        ([449.0, 316.0, 502.0, 562.0], 8, 2),  # 8 ratio-2 anchors overlap it alike (IoU 0.4839)
        ([279.0, 285.0, 293.0, 299.0], 149, 30),  # a 14 px box inside 149 large anchors (IoU 0.012)
    ],
)
def test_anchor_target_keeps_every_tie_of_equal_geometry(gt, tied, kept_by_equality):
    generator = AnchorGenerator()  # the paper's k9 anchors on a 600 x 1000 image
    anchors, anchors64 = generator(38, 63), _anchors64(generator, 38, 63)
    gt = torch.tensor([gt])
    inside = inside_image(anchors, (600, 1000))
    iou64 = torch.where(inside[:, None], box_iou(anchors64, gt.double()), -1.0)[:, 0]
    geometric = iou64 >= iou64.max() * (1 - 1e-12)
    assert int(geometric.sum()) == tied
    iou = torch.where(inside[:, None], box_iou(anchors, gt), -1.0)[:, 0]
    assert int((iou == iou.max()).sum()) == kept_by_equality  # the bug: float equality split the tie
    # every anchor in the sample, all allowed positive: the labels before sampling
    labels, _ = AnchorTargetCreator(n_sample=anchors.shape[0], pos_ratio=1.0)(anchors, gt, (600, 1000))
    assert torch.equal(labels == 1, geometric)
    # best_iou_rtol=0 is the reference implementation's float equality
    labels, _ = AnchorTargetCreator(n_sample=anchors.shape[0], pos_ratio=1.0, best_iou_rtol=0.0)(anchors, gt, (600, 1000))
    assert int((labels == 1).sum()) == kept_by_equality


def test_anchor_target_tie_tolerance_is_relative_and_small():
    gt = _boxes([0, 0, 10, 10])
    anchors = _boxes(
        [0, 0, 20, 20],  # IoU 0.25, the best
        [0, 0, 20, 20.0001],  # 0.2499988: 5e-6 below, within BEST_IOU_RTOL -> also the best
        [0, 0, 20, 20.001],  # 0.2499875: 5e-5 below -> not; IoU < 0.3 -> negative
    )
    iou = box_iou(anchors, gt)[:, 0]
    assert bool(iou[1] < iou[0]) and float(1 - iou[2] / iou[0]) > BEST_IOU_RTOL > float(1 - iou[1] / iou[0])
    labels, _ = AnchorTargetCreator(n_sample=256)(anchors, gt, (100, 100))
    assert labels.tolist() == [1, 1, 0]
