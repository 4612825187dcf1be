"""The Matcher: the same numbers as the whole IoU matrix, whatever the block size; the creators'
rules as before (number for number); bounded memory; and the memory benchmark runs."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.bench.memory import StepMemory, markdown_table, measure, synthetic_targets
from fasterrcnn.boxes import BoxCoder, inside_image
from fasterrcnn.build import build_model, model_config
from fasterrcnn.creators import AnchorTargetCreator, ProposalTargetCreator, subsample_labels
from fasterrcnn.matcher import BEST_IOU_RTOL, Matcher, match_iou

from .conftest import compose_config

BUDGETS = (1, 5, 37, 1000, None)  # IoUs per block; None: the whole matrix


def _grid_boxes(n: int, g: torch.Generator, cells: int = 6, step: float = 8.0) -> torch.Tensor:
    """Boxes with corners on a coarse grid: many exactly equal IoUs (ties) and duplicates."""
    xy = torch.randint(0, cells, (n, 2), generator=g).float() * step
    wh = torch.randint(1, cells, (n, 2), generator=g).float() * step
    return torch.cat((xy, xy + wh), dim=1)


def _whole_matrix(boxes, gt, valid, rtol):
    """The reference: the whole IoU matrix and torch.max, as the creators computed it before."""
    iou = box_iou(boxes, gt)
    if valid is not None:
        iou = torch.where(valid[:, None], iou, -1.0)
    max_iou, matched = iou.max(dim=1)
    gt_max = iou.max(dim=0).values
    best = ((iou >= gt_max * (1 - rtol)) & (gt_max > 0)).any(dim=1)
    return iou, max_iou, matched, gt_max, best


# ----------------------------------------------------------------------------- match_iou
@pytest.mark.parametrize("seed", range(4))
def test_blocks_give_the_whole_matrix_numbers_ties_included(seed):
    g = torch.Generator().manual_seed(seed)
    boxes, gt = _grid_boxes(300, g), _grid_boxes(40, g)
    gt = torch.cat((gt, gt[:7]))  # duplicated ground truths: exact ties across columns
    valid = torch.rand(300, generator=g) > 0.2
    for v in (None, valid):
        iou, max_iou, matched, gt_max, best = _whole_matrix(boxes, gt, v, BEST_IOU_RTOL)
        # on CPU torch.max gives the first maximum on ties: that is the index to keep
        first = torch.where(iou == max_iou[:, None], torch.arange(gt.shape[0]), gt.shape[0]).min(dim=1).values
        assert torch.equal(matched, first)
        assert bool((iou == max_iou[:, None]).sum(dim=1).gt(1).any())  # the case has ties
        for budget in BUDGETS:
            m = match_iou(boxes, gt, valid=v, best_rtol=BEST_IOU_RTOL, max_elements=budget)
            assert torch.equal(m.max_iou, max_iou), budget
            assert torch.equal(m.matched, matched), budget
            assert torch.equal(m.gt_max_iou, gt_max), budget
            assert torch.equal(m.best_of_gt, best), budget


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64)])
def test_blocks_give_box_iou_bits_on_real_valued_boxes(dtypes):
    g = torch.Generator().manual_seed(0)
    boxes = _random_gt(500, g, size=(300, 400)).to(dtypes[0])
    gt = _random_gt(60, g, size=(300, 400)).to(dtypes[1])
    _, max_iou, matched, gt_max, best = _whole_matrix(boxes, gt, None, BEST_IOU_RTOL)
    for budget in BUDGETS:
        m = match_iou(boxes, gt, best_rtol=BEST_IOU_RTOL, max_elements=budget)
        assert m.max_iou.dtype == max_iou.dtype and torch.equal(m.max_iou, max_iou) and torch.equal(m.gt_max_iou, gt_max)
        assert torch.equal(m.matched, matched) and torch.equal(m.best_of_gt, best)


def test_blocks_handle_nan_as_torch_max():
    # zero-area boxes against zero-area ground truths: IoU 0/0 = NaN, which torch.max ranks first
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    _, max_iou, matched, gt_max, _ = _whole_matrix(boxes, gt, None, 0.0)
    assert bool(max_iou.isnan().any())
    for budget in BUDGETS:
        m = match_iou(boxes, gt, max_elements=budget)
        torch.testing.assert_close(m.max_iou, max_iou, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(m.gt_max_iou, gt_max, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(m.matched, matched)


def test_no_ground_truth_or_no_boxes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]])
    m = match_iou(boxes, torch.zeros(0, 4), valid=torch.tensor([True, False]), best_rtol=BEST_IOU_RTOL)
    assert m.max_iou.tolist() == [0.0, -1.0] and m.matched.tolist() == [0, 0] and m.gt_max_iou.shape == (0,)
    assert m.best_of_gt.tolist() == [False, False]
    m = match_iou(torch.zeros(0, 4), boxes)
    assert m.max_iou.shape == (0,) and m.gt_max_iou.tolist() == [-1.0, -1.0]


def test_block_size_is_bounded_by_the_budget(monkeypatch):
    import fasterrcnn.matcher

    shapes, iou_block = [], fasterrcnn.matcher._iou_block

    def spy(gt, gt_area, columns, area, out, tmp, tmp2):
        shapes.append(tuple(out.shape[::-1]))  # (A, g): boxes, ground truths
        return iou_block(gt, gt_area, columns, area, out, tmp, tmp2)

    monkeypatch.setattr(fasterrcnn.matcher, "_iou_block", spy)
    g = torch.Generator().manual_seed(0)
    match_iou(_grid_boxes(100, g), _grid_boxes(1000, g), max_elements=2000)
    assert shapes == [(100, 20)] * 50
    shapes.clear()
    match_iou(_grid_boxes(5000, g), _grid_boxes(3, g), max_elements=2000)  # one column is the least
    assert shapes == [(5000, 1)] * 3
    shapes.clear()
    match_iou(_grid_boxes(10, g), _grid_boxes(25, g), max_elements=200)  # a shorter last block
    assert shapes == [(10, 20), (10, 5)]


# ----------------------------------------------------------------------------- the rules, as before
def _old_anchor_labels(anchors, gt, image_size, pos, neg):
    """AnchorTargetCreator's labelling before sampling, as written before the Matcher (float
    equality for the best anchor of each ground truth)."""
    height, width = image_size
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width) & (anchors[:, 3] <= height)
    labels = torch.full((anchors.shape[0],), -1, dtype=torch.long)
    iou = torch.where(inside[:, None], box_iou(anchors, gt), -1.0)
    max_iou, matched = iou.max(dim=1)
    gt_max = iou.max(dim=0).values
    best = ((iou == gt_max[None]) & (gt_max[None] > 0)).any(dim=1)
    labels = torch.where(inside & (max_iou < neg), 0, labels)
    return torch.where(inside & (best | (max_iou >= pos)), 1, labels), matched


def _old_proposal_targets(creator, rois, gt, gt_labels):
    """ProposalTargetCreator as written before the Matcher (whole matrix), same random draws."""
    rois = torch.cat((rois, gt), dim=0)
    max_iou, matched = box_iou(rois, gt).max(dim=1)
    matched_boxes, matched_labels = gt[matched], gt_labels[matched]
    labels = torch.full_like(matched_labels, -1)
    labels = torch.where((max_iou < creator.neg_iou_thresh_hi) & (max_iou >= creator.neg_iou_thresh_lo), 0, labels)
    labels = torch.where(max_iou >= creator.pos_iou_thresh, matched_labels, labels)
    labels = subsample_labels(labels, creator.n_sample, creator.pos_ratio)
    priority = (labels >= 1).float() * 2 + (labels == 0).float() + torch.rand(labels.shape) * 0.5
    index = priority.topk(min(creator.n_sample, labels.numel())).indices
    return rois[index], labels[index], matched_boxes[index]


def _random_gt(n, g, size=(600, 1000), integer=False):
    height, width = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width - 20.0, height - 20.0])
    wh = 4 + torch.rand(n, 2, generator=g) * 400
    gt = torch.cat((xy, torch.minimum(xy + wh, torch.tensor([float(width), float(height)]))), dim=1)
    return gt.round() if integer else gt


@pytest.mark.parametrize("budget", [3000, None])
def test_matcher_without_tolerance_is_the_old_anchor_rule(budget):
    # The paper's anchors on a 600 x 1000 image and real-valued boxes; with a zero tolerance the
    # Matcher is the float-equality rule of before, label for label.
    anchors = AnchorGenerator()(38, 63)
    inside = inside_image(anchors, (600, 1000))
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True, best_rtol=0.0, max_chunk_elements=budget)
    for seed in range(3):
        gt = _random_gt(50, torch.Generator().manual_seed(seed))
        old, old_matched = _old_anchor_labels(anchors, gt, (600, 1000), 0.7, 0.3)
        labels, matched = matcher(anchors, gt, valid=inside)
        assert torch.equal(labels, old)
        assert torch.equal(matched[old == 1], old_matched[old == 1])


def test_anchor_target_creator_as_before_without_split_ties():
    # Square anchors have exact float32 corners, integer boxes exact IoUs: no tie is split by
    # rounding, so the tolerance changes nothing; same random draws, same sampled labels and deltas.
    generator = AnchorGenerator(scales=(2, 4, 8, 16), ratios=(1.0,))
    anchors = generator(19, 25)
    for seed in range(3):
        gt = _random_gt(40, torch.Generator().manual_seed(seed), size=(300, 400), integer=True)
        old, old_matched = _old_anchor_labels(anchors, gt, (300, 400), 0.7, 0.3)
        torch.manual_seed(seed)
        old = subsample_labels(old, 256, 0.5)
        old_deltas = torch.where((old == 1)[:, None], BoxCoder().encode(anchors, gt[old_matched]), 0.0)
        for budget in (1000, None):
            torch.manual_seed(seed)
            labels, deltas = AnchorTargetCreator(max_chunk_elements=budget)(anchors, gt, (300, 400))
            assert torch.equal(labels, old) and torch.equal(deltas, old_deltas)


@pytest.mark.parametrize("lo", [0.0, 0.1])
def test_proposal_target_creator_as_before(lo):
    g = torch.Generator().manual_seed(0)
    gt = _random_gt(30, g, size=(300, 400))
    rois = torch.cat((_random_gt(2000, g, size=(300, 400)), gt.repeat(5, 1) + torch.randn(150, 4, generator=g) * 3))
    gt_labels = torch.randint(1, 7, (30,), generator=g)
    creator = ProposalTargetCreator(neg_iou_thresh_lo=lo)
    torch.manual_seed(1)
    expected = _old_proposal_targets(creator, rois, gt, gt_labels)
    for budget in (5000, None):
        creator.max_chunk_elements = budget
        torch.manual_seed(1)
        for got, want in zip(creator(rois, gt, gt_labels), expected):
            assert torch.equal(got, want)


# ----------------------------------------------------------------------------- a training step
def test_training_step_losses_do_not_depend_on_the_block_size(tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}", "logger=none", "backbone.widths=[8,16,16,32]", "backbone.head_features=64"])
    model = build_model(model_config(cfg))
    boxes, labels = synthetic_targets(300, (160, 192), model.num_classes)
    images = torch.randn(1, 3, 160, 192)
    results = []
    for budget in (500, None):
        model.anchor_target_creator.max_chunk_elements = budget
        model.proposal_target_creator.max_chunk_elements = budget
        torch.manual_seed(0)
        results.append(model.losses(images, [(160, 192)], [(160, 192)], [boxes], [labels]))
    for key in results[1]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_memory_bench_reports_the_figures():
    results = measure([20], overrides=["backbone.widths=[8,16,16,32]", "backbone.head_features=64"], image_size=(96, 128))
    (r,) = results
    assert isinstance(r, StepMemory) and r.error is None and r.num_objects == 20 and r.chunked
    assert r.peak_rss_mib >= r.base_rss_mib > 0 and r.step_s > 0
    table = markdown_table(results)
    assert "| 20 | chunked |" in table and "peak RSS" in table


def test_synthetic_targets_lie_inside_the_image():
    boxes, labels = synthetic_targets(500, (30, 40), num_classes=3)
    assert boxes.shape == (500, 4) and bool(inside_image(boxes, (30, 40)).all())
    assert bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all()) and set(labels.tolist()) <= {1, 2, 3}
