"""Our kernels against torchvision's, value for value (RoIAlign: to float rounding)."""

import pytest
import torch
from torchvision.ops import roi_align, roi_pool

from fasterrcnn.ops import LOOKUP_CHUNK_BINS, _log2_floor, range_max_table, roi_align_sparse, roi_pool_exact


def _boxes(n_rois: int, n_images: int, height: int, width: int, stride: int, g: torch.Generator) -> torch.Tensor:
    """RoIs of every kind: inside, across the border, outside, tiny, degenerate, inverted, half-pixel corners."""
    size = torch.tensor([width * stride, height * stride], dtype=torch.float32)
    xy = torch.rand(n_rois, 2, generator=g) * size * 1.2 - 0.1 * size
    wh = torch.rand(n_rois, 2, generator=g) * size * torch.rand(n_rois, 1, generator=g)
    boxes = torch.cat((xy, xy + wh), dim=1)
    boxes[::7, 2:] = boxes[::7, :2]  # zero size
    boxes[1::11, 2:] = boxes[1::11, :2] - 5  # inverted
    boxes[2::13] = (boxes[2::13] / (stride / 2)).round() * (stride / 2)  # corners at x.5 feature cells
    index = torch.randint(0, n_images, (n_rois, 1), generator=g).float()
    return torch.cat((index, boxes), dim=1)


@pytest.mark.parametrize(("n", "c", "h", "w", "size", "stride"), [(1, 8, 19, 25, 7, 16), (2, 3, 5, 9, 7, 16), (1, 4, 38, 63, 7, 16), (1, 5, 1, 1, 2, 8), (2, 6, 13, 4, 14, 16)])
def test_roi_pool_exact_is_torchvisions(n, c, h, w, size, stride):
    g = torch.Generator().manual_seed(h * w + c)
    for features in (torch.randn(n, c, h, w, generator=g), torch.randint(-3, 3, (n, c, h, w), generator=g).float()):  # real values, many ties
        boxes = _boxes(300, n, h, w, stride, g)
        expected = roi_pool(features, boxes, size, 1.0 / stride)
        assert torch.equal(roi_pool_exact(features, boxes, size, 1.0 / stride), expected)
        cl = features.contiguous(memory_format=torch.channels_last)
        assert torch.equal(roi_pool_exact(cl, boxes, size, 1.0 / stride), expected)


def test_range_max_table_builds_only_the_levels_asked_for():
    features = torch.randn(2, 3, 11, 6)
    full = range_max_table(features)
    assert full.shape == (2, 4, 3, 11, 6, 3)  # 11 rows: levels 1, 2, 4, 8; 6 columns: 1, 2, 4
    part = range_max_table(features, 2, 3)
    assert torch.equal(part, full[:, :2])
    # level (i, j) at (h, w): the maximum over rows h .. h + 2**i - 1, columns w .. w + 2**j - 1 (clipped)
    for i, j, h, w in ((0, 0, 3, 2), (1, 2, 0, 1), (3, 1, 5, 5), (2, 2, 9, 4)):
        block = features[:, :, h : h + (1 << i), w : w + (1 << j)]
        assert torch.equal(full[:, i, j, h, w], block.amax(dim=(2, 3)))


def test_roi_pool_exact_over_several_lookup_chunks_with_big_and_tiny_rois():
    """More bins than one lookup chunk; RoIs that need every level of the table and 1-cell ones."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(1, 6, 40, 50, generator=g)
    boxes = _boxes(2 * LOOKUP_CHUNK_BINS // 49 + 7, 1, 40, 50, 8, g)
    boxes[0, 1:] = torch.tensor([0.0, 0.0, 399.0, 319.0])  # the whole map: 7 x 7 bins of 5-8 cells
    boxes[1, 1:] = torch.tensor([8.0, 8.0, 8.0, 8.0])  # one cell
    assert torch.equal(roi_pool_exact(features, boxes, 7, 1 / 8), roi_pool(features, boxes, 7, 1 / 8))


def test_roi_pool_exact_without_rois():
    assert roi_pool_exact(torch.randn(1, 4, 5, 5), torch.zeros(0, 5), 7, 1 / 16).shape == (0, 4, 7, 7)


def test_log2_floor():
    n = torch.arange(1, 5000)
    assert torch.equal(_log2_floor(n), torch.tensor([int(v).bit_length() - 1 for v in n]))


def test_the_roi_head_pools_exactly_at_inference_and_with_torchvision_in_training():
    from fasterrcnn.heads import RoIHead

    head = RoIHead(torch.nn.Flatten(), 4 * 7 * 7, num_classes=2)
    features = torch.randn(1, 4, 19, 25, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    rois = _boxes(50, 1, 19, 25, 16, g)[:, 1:]
    index = torch.zeros(50, dtype=torch.long)
    trained = head.pool(features, rois, index)
    assert trained.requires_grad  # torchvision's kernel, with its backward
    with torch.no_grad():
        inferred = head.pool(features, rois, index)
    assert torch.equal(inferred, trained.detach())


# ---------------------------------------------------------------------------- RoIAlign
ALIGN_CASES = [(1, 8, 19, 25, 7, 16), (2, 3, 5, 9, 7, 8), (1, 4, 38, 50, 7, 8), (1, 5, 1, 1, 2, 8), (2, 6, 13, 4, 14, 7)]


@pytest.mark.parametrize(("n", "c", "h", "w", "size", "stride"), ALIGN_CASES)
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_sparse_is_torchvisions_with_its_gradient(n, c, h, w, size, stride, sampling_ratio, aligned):
    """The same samples and weights as torchvision's kernel: equal values with one sample per
    bin, float rounding apart with more (the sums' order); the features' gradient likewise."""
    g = torch.Generator().manual_seed(h * w + c + sampling_ratio)
    features = torch.randn(n, c, h, w, generator=g)
    boxes = _boxes(200, n, h, w, stride, g)
    grad = torch.randn(200, c, size, size, generator=g)
    ours_in, theirs_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    theirs = roi_align(theirs_in, boxes, size, 1.0 / stride, sampling_ratio, aligned)
    ours = roi_align_sparse(ours_in, boxes, size, 1.0 / stride, sampling_ratio, aligned)
    tol = dict(rtol=0, atol=0) if sampling_ratio == 1 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, **tol)
    theirs.backward(grad)
    ours.backward(grad)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-5)
    cl = features.contiguous(memory_format=torch.channels_last)  # the trunk's layout: a view, no copy
    torch.testing.assert_close(roi_align_sparse(cl, boxes, size, 1.0 / stride, sampling_ratio, aligned), theirs.detach(), **tol)


def test_roi_align_sparse_gradcheck():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = _boxes(9, 2, 6, 7, 8, g).double()
    assert torch.autograd.gradcheck(lambda f: roi_align_sparse(f, boxes, 3, 1 / 8, 2, True), (features,))


def test_roi_align_sparse_reads_nothing_off_the_map_for_non_finite_rois():
    """A NaN or infinite corner (which torchvision's kernel would turn into an index out of
    bounds) weighs nothing: such samples read zeros, the finite RoIs pool as before."""
    features = torch.randn(1, 3, 6, 7)
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor([[0, 8.0, 8.0, 40.0, 30.0], [0, nan, nan, nan, nan], [0, -inf, -inf, inf, inf]])
    out = roi_align_sparse(features, boxes, 3, 1 / 8)
    torch.testing.assert_close(out[:1], roi_align(features, boxes[:1], 3, 1 / 8, 2, True), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))


def test_roi_align_sparse_without_rois_and_without_a_fixed_sampling_ratio():
    assert roi_align_sparse(torch.randn(1, 4, 5, 5), torch.zeros(0, 5), 7, 1 / 16).shape == (0, 4, 7, 7)
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        roi_align_sparse(torch.randn(1, 4, 5, 5), torch.zeros(1, 5), 7, 1 / 16, sampling_ratio=0)


def test_the_roi_head_aligns_with_the_sparse_product_on_the_cpu(monkeypatch):
    """``roi_align`` heads on the CPU train and infer through ``roi_align_sparse``
    (torchvision's kernel only with the adaptive sampling ratio, 0)."""
    import fasterrcnn.heads
    from fasterrcnn.heads import RoIHead

    calls = []
    monkeypatch.setattr(fasterrcnn.heads, "roi_align_sparse", lambda *a: calls.append(a[4]) or roi_align_sparse(*a))
    features = torch.randn(1, 4, 19, 25, requires_grad=True)
    rois = _boxes(50, 1, 19, 25, 16, torch.Generator().manual_seed(0))[:, 1:]
    index = torch.zeros(50, dtype=torch.long)
    head = RoIHead(torch.nn.Flatten(), 4 * 7 * 7, num_classes=2, pooling="roi_align")
    trained = head.pool(features, rois, index)
    trained.sum().backward()
    assert trained.requires_grad and features.grad is not None and calls == [2]
    expected = roi_align(features, torch.cat((index[:, None].float(), rois), dim=1), 7, 1 / 16, 2, True)
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    adaptive = RoIHead(torch.nn.Flatten(), 4 * 7 * 7, num_classes=2, pooling="roi_align", sampling_ratio=0)
    torch.testing.assert_close(adaptive.pool(features, rois, index), roi_align(features, torch.cat((index[:, None].float(), rois), dim=1), 7, 1 / 16, 0, True))
    assert calls == [2]
