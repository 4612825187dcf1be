"""Tensor kernels of our own, where torchvision's are slow on the CPU and an exact vectorised
version is cheap. Each one matches its torchvision twin (tests/test_ops.py): RoIPool value for
value, RoIAlign to float rounding (the same samples and weights, summed in another order).

Shape legend: N images, C channels, H x W feature map, R RoIs, P x Q pooled size.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    return (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)


def roi_pool_bins(boxes: Tensor, output_size: tuple[int, int], spatial_scale: float, height: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The max-pooling bins of Caffe's RoIPool, in the arithmetic of torchvision's CPU kernel.

    Args:
        boxes: ``(R, 5)`` ``(batch index, x1, y1, x2, y2)`` in input pixels (float32).
    Returns:
        ``hstart, hend (R, P)`` and ``wstart, wend (R, Q)`` int64, clipped to the feature map;
        an empty bin has ``end <= start``.
    """
    pooled_h, pooled_w = output_size
    scale = torch.tensor(spatial_scale, dtype=boxes.dtype)
    start_w = _round_half_away(boxes[:, 1] * scale)
    start_h = _round_half_away(boxes[:, 2] * scale)
    end_w = _round_half_away(boxes[:, 3] * scale)
    end_h = _round_half_away(boxes[:, 4] * scale)
    roi_w = torch.clamp(end_w - start_w + 1, min=1)  # malformed RoIs become 1 x 1
    roi_h = torch.clamp(end_h - start_h + 1, min=1)
    bin_h = roi_h / pooled_h  # float32, as the kernel's T
    bin_w = roi_w / pooled_w
    ph = torch.arange(pooled_h, dtype=boxes.dtype, device=boxes.device)
    pw = torch.arange(pooled_w, dtype=boxes.dtype, device=boxes.device)
    hstart = torch.floor(ph[None] * bin_h[:, None]) + start_h[:, None]
    hend = torch.ceil((ph[None] + 1) * bin_h[:, None]) + start_h[:, None]
    wstart = torch.floor(pw[None] * bin_w[:, None]) + start_w[:, None]
    wend = torch.ceil((pw[None] + 1) * bin_w[:, None]) + start_w[:, None]
    clip_h = lambda t: t.clamp(0, height).long()  # noqa: E731
    clip_w = lambda t: t.clamp(0, width).long()  # noqa: E731
    return clip_h(hstart), clip_h(hend), clip_w(wstart), clip_w(wend)


def _log2_floor(n: Tensor) -> Tensor:
    """``floor(log2(n))`` of positive int64 ``n``, exactly."""
    k = torch.zeros_like(n)
    for bit in (32, 16, 8, 4, 2, 1):
        big = (n >> bit) > 0
        k = k + big * bit
        n = torch.where(big, n >> bit, n)
    return k


def range_max_table(features: Tensor, levels_h: int | None = None, levels_w: int | None = None) -> Tensor:
    """The 2-D sparse table of ``features (N, C, H, W)``: ``(N, LH, LW, H, W, C)`` whose entry
    ``[n, i, j, h, w]`` is the maximum over rows ``h .. h + 2**i - 1`` and columns
    ``w .. w + 2**j - 1`` (where those exist), so that the maximum over any rectangle of up to
    ``2**LH`` rows and ``2**LW`` columns is the maximum of 4 entries. ``levels_h, levels_w``
    (``LH, LW``): how many levels to build (default: all, ``H.bit_length()`` and
    ``W.bit_length()``); RoI bins need only those of their largest side. Channels last, so each
    lookup reads C contiguous values."""
    n, c, height, width = features.shape
    levels_h = levels_h or max(height, 1).bit_length()
    levels_w = levels_w or max(width, 1).bit_length()
    table = features.new_empty((n, levels_h, levels_w, height, width, c))
    table[:, 0, 0] = features.permute(0, 2, 3, 1)  # level (0, 0): (N, H, W, C)
    for i in range(levels_h):
        if i:  # rows: level (i, 0) from (i - 1, 0)
            prev, step = table[:, i - 1, 0], 1 << (i - 1)
            table[:, i, 0, height - step :] = prev[:, height - step :]
            torch.maximum(prev[:, : height - step], prev[:, step:], out=table[:, i, 0, : height - step])
        for j in range(1, levels_w):  # columns: level (i, j) from (i, j - 1)
            prev, step = table[:, i, j - 1], 1 << (j - 1)
            table[:, i, j, :, width - step :] = prev[:, :, width - step :]
            torch.maximum(prev[:, :, : width - step], prev[:, :, step:], out=table[:, i, j, :, : width - step])
    return table


# Bins gathered per step of roi_pool_exact's lookup: 4 x 1024 rows of C floats stay in cache.
LOOKUP_CHUNK_BINS = 1024


@torch.no_grad()
def roi_pool_exact(features: Tensor, boxes: Tensor, output_size: int | tuple[int, int], spatial_scale: float) -> Tensor:
    """``torchvision.ops.roi_pool(features, boxes, output_size, spatial_scale)``, vectorised:
    every bin's maximum from 4 lookups in :func:`range_max_table` (built up to the levels the
    largest bin needs), the same values as the kernel (a maximum is exact; empty bins are 0).
    Forward only (no gradient): the detector uses it at inference, where torchvision's CPU
    kernel pools one RoI, channel and bin at a time on one thread.

    Args:
        features: ``(N, C, H, W)`` float; boxes: ``(R, 5)`` ``(batch index, x1, y1, x2, y2)``.
    Returns:
        ``(R, C, P, Q)``, a channels-last view (``(R, P, Q, C)`` in memory).
    """
    output_size = _pair(output_size)
    n, c, height, width = features.shape
    r = boxes.shape[0]
    pooled_h, pooled_w = output_size
    if r == 0:
        return features.new_zeros((0, c, pooled_h, pooled_w))
    hstart, hend, wstart, wend = roi_pool_bins(boxes.to(features.dtype), output_size, spatial_scale, height, width)
    len_h = (hend - hstart).clamp(min=1)
    len_w = (wend - wstart).clamp(min=1)
    i, j = _log2_floor(len_h), _log2_floor(len_w)  # (R, P), (R, Q)
    levels_h, levels_w = int(i.max()) + 1, int(j.max()) + 1
    flat = range_max_table(features, levels_h, levels_w).reshape(-1, c)  # rows indexed by (n, i, j, h, w)

    # the 4 corners' rows in ``flat``: (4, R P Q)
    base_h = (boxes[:, 0].long().clamp(0, n - 1)[:, None] * levels_h + i) * levels_w  # (R, P)
    row = lambda h, jw: ((base_h[:, :, None] + jw[:, None, :]) * height + h[:, :, None]) * width  # noqa: E731
    h_lo, h_hi = hstart.clamp(max=height - 1), (hend - (1 << i)).clamp(0, height - 1)
    w_lo, w_hi = wstart.clamp(max=width - 1)[:, None, :], (wend - (1 << j)).clamp(0, width - 1)[:, None, :]
    corners = torch.stack((row(h_lo, j) + w_lo, row(h_lo, j) + w_hi, row(h_hi, j) + w_lo, row(h_hi, j) + w_hi)).reshape(4, -1)
    bins = corners.shape[1]

    out = features.new_empty((bins, c))  # (R P Q, C)
    other = features.new_empty((min(LOOKUP_CHUNK_BINS, bins), c))
    for start in range(0, bins, LOOKUP_CHUNK_BINS):
        stop = min(start + LOOKUP_CHUNK_BINS, bins)
        got, more = out[start:stop], other[: stop - start]
        torch.index_select(flat, 0, corners[0, start:stop], out=got)
        for k in (1, 2, 3):
            torch.index_select(flat, 0, corners[k, start:stop], out=more)
            torch.maximum(got, more, out=got)
    empty = (hend <= hstart)[:, :, None] | (wend <= wstart)[:, None, :]  # (R, P, Q)
    out = out.view(r, pooled_h, pooled_w, c)
    if bool(empty.any()):
        out.masked_fill_(empty[..., None], 0.0)
    return out.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ RoIAlign
def _align_axis(start: Tensor, length: Tensor, bins: int, grid: int, size: int) -> tuple[Tensor, Tensor]:
    """Along one axis of each RoI, the two feature cells each of the ``bins x grid`` samples
    reads and their bilinear weights, in the arithmetic of torchvision's CPU RoIAlign kernel
    (``pre_calc_for_bilinear_interpolate``): a sample beyond ``[-1, size]`` weighs 0 (so
    does a NaN or infinite one, which the kernel would read out of bounds), one below 0 reads
    cell 0, one past the last cell centre reads the last cell.

    Args:
        start, length: ``(R,)`` the RoI's first coordinate and extent in feature cells.
    Returns:
        ``cells (R, bins, 2 grid)`` int64 and ``weights (R, bins, 2 grid)``: per bin, each
        sample's low and high neighbour.
    """
    bin_size = length / bins
    p = torch.arange(bins, dtype=start.dtype, device=start.device)
    i = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    coord = start[:, None, None] + p[None, :, None] * bin_size[:, None, None] + i[None, None, :] * bin_size[:, None, None] / grid
    inside = (coord >= -1.0) & (coord <= size)  # False for NaN and infinite coordinates too
    coord = torch.where(inside, coord, 0.0).clamp(min=0)
    low = coord.long()  # C's (int) of a non-negative value: every index stays on the map
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, 0.0, coord - low.to(coord.dtype))
    weights = torch.stack((1.0 - frac, frac), dim=-1) * inside[..., None]  # (R, bins, grid, 2)
    return torch.stack((low, high), dim=-1).flatten(2), weights.flatten(2)


def roi_align_matrix(
    boxes: Tensor, shape: tuple[int, int, int], output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, Tensor]:
    """RoIAlign as a sparse matrix: bin ``b`` of RoI ``r`` (row ``r P Q + b``) is the weighted
    sum of ``(2 g)^2`` feature cells (columns ``(n H + y) W + x``), ``g = sampling_ratio``:
    ``g x g`` bilinear samples of 2 x 2 cells each, averaged. The weights factor into a row
    and a column part, so the work is per axis.

    Args:
        boxes: ``(R, 5)`` ``(batch index, x1, y1, x2, y2)`` in input pixels.
        shape: the features' ``(N, H, W)``.
    Returns:
        ``columns (R P Q (2 g)^2,)`` int64 and ``weights`` like it, ``(2 g)^2`` per row.
    """
    n, height, width = shape
    pooled_h, pooled_w = output_size
    g = sampling_ratio
    offset = 0.5 if aligned else 0.0
    # the kernel's arithmetic: spatial_scale and the offset in the boxes' dtype
    corners = boxes[:, 1:] * torch.tensor(spatial_scale, dtype=boxes.dtype) - offset
    x1, y1 = corners[:, 0], corners[:, 1]
    roi_w, roi_h = corners[:, 2] - x1, corners[:, 3] - y1
    if not aligned:  # the legacy rule: at least one cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    rows, wy = _align_axis(y1, roi_h, pooled_h, g, height)  # (R, P, 2g)
    cols, wx = _align_axis(x1, roi_w, pooled_w, g, width)  # (R, Q, 2g)
    image = boxes[:, 0].long().clamp(0, n - 1)[:, None, None, None, None]  # as roi_pool_exact: no index off the features
    columns = (image * height + rows[:, :, None, :, None]) * width + cols[:, None, :, None, :]  # (R, P, Q, 2g, 2g)
    weights = (wy[:, :, None, :, None] * wx[:, None, :, None, :]) / (g * g)
    return columns.reshape(-1), weights.reshape(-1)


def _csr(crow: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, size=size, check_invariants=False)


class _SparseRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, boxes: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
        n, c, height, width = features.shape
        columns, weights = roi_align_matrix(boxes.to(features.dtype), (n, height, width), output_size, spatial_scale, sampling_ratio, aligned)
        per_row = (2 * sampling_ratio) ** 2
        rows = boxes.shape[0] * output_size[0] * output_size[1]
        crow = torch.arange(0, rows * per_row + 1, per_row, device=features.device)
        flat = features.permute(0, 2, 3, 1).reshape(n * height * width, c)  # a view for channels-last features
        with torch.autocast(features.device.type, enabled=False):  # autocast would cast the product to bf16, which MKL's has not
            out = torch.sparse.mm(_csr(crow, columns, weights, (rows, n * height * width)), flat)  # (R P Q, C)
        ctx.save_for_backward(columns, weights)
        ctx.shape, ctx.per_row = (n, c, height, width), per_row
        return out.view(boxes.shape[0], *output_size, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        columns, weights = ctx.saved_tensors
        n, c, height, width = ctx.shape
        cells = n * height * width
        # The transpose as CSR: entries grouped by feature cell (a stable sort keeps each
        # cell's bins in order, so the sums are deterministic).
        order = columns.argsort(stable=True)
        crow = torch.zeros(cells + 1, dtype=torch.long, device=grad.device)
        crow[1:] = torch.bincount(columns, minlength=cells).cumsum(0)
        transpose = _csr(crow, order.div(ctx.per_row, rounding_mode="floor"), weights[order], (cells, columns.numel() // ctx.per_row))
        grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, c)  # (R P Q, C)
        with torch.autocast(grad.device.type, enabled=False):
            grad_features = torch.sparse.mm(transpose, grad_rows.to(weights.dtype)).view(n, height, width, c).permute(0, 3, 1, 2)
        return grad_features, None, None, None, None, None


def roi_align_sparse(
    features: Tensor, boxes: Tensor, output_size: int | tuple[int, int], spatial_scale: float, sampling_ratio: int = 2, aligned: bool = True
) -> Tensor:
    """``torchvision.ops.roi_align(features, boxes, output_size, spatial_scale, sampling_ratio,
    aligned)`` for ``sampling_ratio > 0``, as one sparse-by-dense product per pass: the bins
    are rows of :func:`roi_align_matrix` times the ``(N H W, C)`` features, and the gradient
    is its transpose times the bins' gradient. The same sample points and weights as the
    kernel, so the values differ from it only in the order of the sums (float rounding; with
    one sample per bin they are equal); torchvision's CPU kernel loops over RoIs, channels and
    samples on one thread, and its backward costs 8x its forward.

    Args:
        features: ``(N, C, H, W)`` float; boxes: ``(R, 5)`` ``(batch index, x1, y1, x2, y2)``.
    Returns:
        ``(R, C, P, Q)``, a channels-last view (``(R, P, Q, C)`` in memory).
    """
    output_size = _pair(output_size)
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_sparse needs sampling_ratio > 0 (the adaptive count is per RoI), got {sampling_ratio}")
    if boxes.shape[0] == 0:
        return features.new_zeros((0, features.shape[1], *output_size))
    return _SparseRoIAlign.apply(features, boxes, output_size, float(spatial_scale), int(sampling_ratio), bool(aligned))
