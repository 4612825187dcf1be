"""The two heads of Faster R-CNN: the RPN head and the RoI head.

Shape legend: N images, C feature channels, H x W feature map, k anchors per location,
A = H*W*k anchors per image, R RoIs over the batch, S x S pooled size, K object classes
(the heads predict K + 1 outputs, background included).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.ops import roi_align, roi_pool

from fasterrcnn.boxes import BoxCoder
from fasterrcnn.ops import roi_align_sparse, roi_pool_exact

# The paper recipe's normalisation of the RoI head's deltas (torchvision's weights (10, 10, 5, 5)).
ROI_DELTA_STD = (0.1, 0.1, 0.2, 0.2)


def _normal_init(layer: nn.Conv2d | nn.Linear, std: float) -> None:
    """The paper: new layers start from a zero-mean Gaussian, biases at zero."""
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    nn.init.zeros_(layer.bias)


class RPNHead(nn.Module):
    """3x3 conv then two sibling 1x1 convs: 2k objectness scores (softmax over
    background/foreground, as the paper) and 4k deltas ``(dx, dy, dw, dh)``."""

    def __init__(self, in_channels: int, num_anchors: int, mid_channels: int = 512, init_std: float = 0.01) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.score = nn.Conv2d(mid_channels, num_anchors * 2, 1)
        self.loc = nn.Conv2d(mid_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.score, self.loc):
            _normal_init(layer, init_std)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            features: ``(N, C, H, W)``.
        Returns:
            pred_objectness_logits ``(N, A, 2)`` (index 1 is foreground) and
            pred_anchor_deltas ``(N, A, 4)``, both in the anchors' order (location-major).
        """
        n = features.shape[0]
        h = torch.relu(self.conv(features))
        logits = self.score(h).permute(0, 2, 3, 1).reshape(n, -1, 2)  # (N, H, W, k*2) -> (N, A, 2)
        deltas = self.loc(h).permute(0, 2, 3, 1).reshape(n, -1, 4)  # (N, H, W, k*4) -> (N, A, 4)
        return logits, deltas


class RoIHead(nn.Module):
    """RoI pooling to S x S at the feature stride, the backbone's head, then a (K+1)-way
    classifier and a class-specific regressor with 4 (K+1) outputs (84 for VOC).

    Args:
        head: the backbone's per-RoI network, ``(R, C, S, S) -> (R, D)``.
        in_features: D.
        num_classes: K, background excluded.
        roi_size: S.
        spatial_scale: 1 / feature stride.
        pooling: ``"roi_pool"`` (the paper's max pooling) or ``"roi_align"``.
        sampling_ratio, aligned: RoIAlign's settings (ignored by RoIPool).
        box_coder: codes the deltas this head predicts (targets in training, boxes at
            prediction); default: std ``(0.1, 0.1, 0.2, 0.2)``, the paper's recipe.
    """

    def __init__(
        self,
        head: nn.Module,
        in_features: int,
        num_classes: int,
        roi_size: int = 7,
        spatial_scale: float = 1 / 16,
        pooling: str = "roi_pool",
        sampling_ratio: int = 2,
        aligned: bool = True,
        cls_init_std: float = 0.01,
        bbox_init_std: float = 0.001,
        box_coder: BoxCoder | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("roi_pool", "roi_align"):
            raise ValueError(f"model.roi_head.pooling must be 'roi_pool' or 'roi_align', got {pooling!r}")
        self.head = head
        self.num_classes = num_classes
        self.roi_size = roi_size
        self.spatial_scale = spatial_scale
        self.pooling = pooling
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.box_coder = box_coder or BoxCoder(std=ROI_DELTA_STD)
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, (num_classes + 1) * 4)
        _normal_init(self.cls_score, cls_init_std)
        _normal_init(self.bbox_pred, bbox_init_std)

    def pool(self, features: Tensor, rois: Tensor, batch_index: Tensor) -> Tensor:
        """``(N, C, H, W)``, rois ``(R, 4)`` in input pixels, batch_index ``(R,)`` -> ``(R, C, S, S)``."""
        if features.dtype in (torch.float16, torch.bfloat16):
            # Under autocast: torchvision's CPU RoI kernels take no bf16, and RoI corners in
            # bf16 would be off by pixels; pooling (a max or an average) loses nothing in fp32.
            features = features.float()
        boxes = torch.cat((batch_index[:, None].to(rois.dtype), rois), dim=1)  # (R, 5)
        boxes = boxes.to(features.dtype)
        if self.pooling == "roi_pool":
            if features.device.type == "cpu" and not (torch.is_grad_enabled() and features.requires_grad):
                # Inference on the CPU: the same values as torchvision's kernel, which pools one
                # RoI, channel and bin at a time on one thread (fasterrcnn.ops, docs/speed.md).
                return roi_pool_exact(features, boxes, self.roi_size, self.spatial_scale)
            return roi_pool(features, boxes, self.roi_size, self.spatial_scale)
        if features.device.type == "cpu" and self.sampling_ratio > 0:
            # The CPU: the same samples and weights as torchvision's kernel as one sparse
            # product each way (fasterrcnn.ops); its backward is 10x faster than the kernel's.
            return roi_align_sparse(features, boxes, self.roi_size, self.spatial_scale, self.sampling_ratio, self.aligned)
        return roi_align(features, boxes, self.roi_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def forward(self, features: Tensor, rois: Tensor, batch_index: Tensor) -> tuple[Tensor, Tensor]:
        """
        Returns:
            pred_class_logits ``(R, K+1)`` and pred_deltas ``(R, K+1, 4)`` (normalised deltas).
        """
        with record_function("roi_pool"):
            pooled = self.pool(features, rois, batch_index)  # (R, C, S, S)
        with record_function("roi_head_layers"):
            x = self.head(pooled)  # (R, D)
            return self.cls_score(x), self.bbox_pred(x).view(-1, self.num_classes + 1, 4)
