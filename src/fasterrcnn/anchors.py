"""Anchors (Section 3.1.1 of the paper).

Shape legend: A = anchors per location (len(ratios) * len(scales)), H x W = feature map.

An anchor of scale ``s`` and ratio ``r`` (height / width) has area ``(base_size * s) ** 2`` and
``h = base_size * s * sqrt(r)``, ``w = base_size * s / sqrt(r)``, ordered ratios-major as in
the reference implementation. Anchor centres sit at the centre of each feature cell,
``((j + 0.5) * stride, (i + 0.5) * stride)``; with ``base_size == stride == 16`` this is the
reference's ``base_size / 2 + 16 * j``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def anchor_base(base_size: float, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The A anchors of one location, centred at the origin: ``(A, 4)`` x1y1x2y2.

    >>> anchor_base(16, scales=[1], ratios=[1.0])
    tensor([[-8., -8.,  8.,  8.]])
    """
    rows = []
    for r in ratios:
        for s in scales:
            h = base_size * s * math.sqrt(r)
            w = base_size * s * math.sqrt(1.0 / r)
            rows.append((-w / 2, -h / 2, w / 2, h / 2))
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(base: Tensor, height: int, width: int, stride: int) -> Tensor:
    """Every anchor of an ``height x width`` feature map: ``(H * W * A, 4)``.

    Ordered location-major (row by row, then column), then the A anchors of that location,
    which is the order of the RPN head's outputs after ``permute(0, 2, 3, 1)``.
    """
    ys = (torch.arange(height, device=base.device, dtype=base.dtype) + 0.5) * stride
    xs = (torch.arange(width, device=base.device, dtype=base.dtype) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)  # (H*W*A, 4)


class AnchorGenerator(nn.Module):
    """Makes the anchors for a feature map; the base anchors follow the module's device.

    Args:
        scales: anchor scales, multiples of ``base_size`` (the paper: 8, 16, 32).
        ratios: height / width ratios (the paper: 0.5, 1, 2).
        base_size: side of a scale-1 anchor in input pixels (16).
        stride: feature stride of the backbone, in input pixels per feature cell.
    """

    def __init__(
        self,
        scales: Sequence[float] = (8, 16, 32),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        base_size: float = 16,
        stride: int = 16,
    ) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        self.ratios = tuple(float(r) for r in ratios)
        self.base_size = float(base_size)
        self.stride = int(stride)
        self.register_buffer("base", anchor_base(self.base_size, self.scales, self.ratios), persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors(self) -> int:
        """k, the number of anchors per location."""
        return self.base.shape[0]

    def extra_repr(self) -> str:
        return f"scales={self.scales}, ratios={self.ratios}, base_size={self.base_size}, stride={self.stride}"

    def forward(self, height: int, width: int) -> Tensor:
        """Anchors ``(H * W * A, 4)`` for an ``height x width`` feature map (cached per size)."""
        key = (height, width, self.base.device, self.base.dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = grid_anchors(self.base, height, width, self.stride)
            if len(self._cache) > 64:  # bounded: image sizes vary with aspect ratio
                self._cache.clear()
            self._cache[key] = anchors
        return anchors
