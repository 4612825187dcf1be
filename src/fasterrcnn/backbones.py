"""Backbones: a trunk that makes the shared feature map and a head that runs on each pooled RoI.

Shape legend: N images, C trunk channels, H x W feature map (input / stride), R RoIs,
S x S pooled RoI size, D head output features.

* ``trunk``: ``(N, 3, H*stride, W*stride) -> (N, C, H, W)``
* ``head``:  ``(R, C, S, S) -> (R, D)``

With batch size 1 BatchNorm statistics are meaningless, so pretrained backbones run with
frozen BatchNorm (:class:`torchvision.ops.FrozenBatchNorm2d`) and backbones trained from scratch
use GroupNorm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """The parts of a backbone that Faster R-CNN needs."""

    trunk: nn.Module
    head: nn.Module
    out_channels: int  # C
    head_out_features: int  # D
    stride: int = 16
    roi_size: int = 7  # S
    mean: Sequence[float] = field(default=IMAGENET_MEAN)  # the normalisation the weights expect
    std: Sequence[float] = field(default=IMAGENET_STD)


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were asked for and cannot be had."""


def load_imagenet_weights(weights: torchvision.models.WeightsEnum, weights_path: str | None = None) -> dict:
    """State dict of torchvision's ImageNet ``weights``, from ``weights_path``, the local torch hub
    cache, or a download; a clear :class:`PretrainedWeightsError` when none of these works."""
    if weights_path:
        if not os.path.isfile(weights_path):
            raise PretrainedWeightsError(f"backbone.weights_path={weights_path!r} does not exist.")
        return torch.load(weights_path, map_location="cpu", weights_only=True)
    filename = os.path.basename(weights.url)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    try:
        return weights.get_state_dict(progress=True, check_hash=False)
    except Exception as err:  # URLError, HTTPError, ssl errors, a truncated file, ...
        raise PretrainedWeightsError(
            f"Could not load ImageNet weights {weights} (looked for {cached}, then tried to download "
            f"{weights.url}): {err}.\nEither copy that file to {cached} on this machine, pass "
            f"backbone.weights_path=/path/to/{filename}, or train from scratch with backbone.pretrained=false."
        ) from err


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def vgg16(
    pretrained: bool = True,
    freeze_blocks: int = 2,
    weights_path: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    load_weights: bool = True,
) -> Backbone:
    """VGG16 as in the paper: trunk conv1_1..conv5_3 (stride 16, 512 channels, last max-pool
    removed); head fc6 and fc7 (4096) without dropout, as the reference implementation.

    Args:
        pretrained: load torchvision's ImageNet weights.
        freeze_blocks: number of leading conv blocks whose weights stay fixed (2 in the
            reference: conv1 and conv2).
        weights_path: optional local file with the torchvision state dict.
        mean, std: the input normalisation the weights expect (the DataModule applies it).
        load_weights: False builds the pretrained network without fetching its weights (they
            come from a detector checkpoint).
    """
    net = torchvision.models.vgg16()
    if pretrained and load_weights:
        net.load_state_dict(load_imagenet_weights(torchvision.models.VGG16_Weights.IMAGENET1K_V1, weights_path))
    features = net.features[:30]  # drop the final max-pool: stride 16
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    if freeze_blocks > 0:
        _freeze(features[: pools[freeze_blocks - 1] + 1])
    head = nn.Sequential(
        nn.Flatten(),
        net.classifier[0],  # fc6
        nn.ReLU(inplace=True),
        net.classifier[3],  # fc7
        nn.ReLU(inplace=True),
    )
    return Backbone(features, head, out_channels=512, head_out_features=4096, stride=16, roi_size=7, mean=mean, std=std)


_RESNETS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
}


def resnet_c4(
    depth: str = "resnet50",
    pretrained: bool = True,
    freeze_blocks: int = 2,
    roi_size: int = 14,
    weights_path: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    load_weights: bool = True,
) -> Backbone:
    """ResNet in the C4 form of the Faster R-CNN paper's ResNet experiments: trunk conv1..res4
    (stride 16), head res5 + global average pooling.

    Pretrained: frozen BatchNorm everywhere; ``freeze_blocks`` stages frozen (1 = stem,
    2 = stem + res2). From scratch: GroupNorm(32) and nothing frozen.
    ``roi_size`` 14 is the usual C4 choice: res5 halves it to 7 x 7. ``load_weights`` False
    builds the pretrained form (frozen BatchNorm) without fetching the ImageNet weights, for a
    detector checkpoint that brings its own.
    """
    build, weights = _RESNETS[depth]
    if pretrained:
        net = build(norm_layer=FrozenBatchNorm2d)
        if load_weights:
            state = load_imagenet_weights(weights, weights_path)
            # FrozenBatchNorm2d keeps no step counter; everything else must match.
            net.load_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    else:
        net = build(norm_layer=partial(nn.GroupNorm, 32))
        freeze_blocks = 0
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [stem, net.layer1, net.layer2, net.layer3]
    for stage in stages[:freeze_blocks]:
        _freeze(stage)
    trunk = nn.Sequential(*stages)
    head = nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(
        trunk,
        head,
        out_channels=net.layer4[0].conv1.in_channels,  # what res4 puts out: 256 (18/34) or 1024
        head_out_features=net.fc.in_features,
        stride=16,
        roi_size=roi_size,
        mean=mean,
        std=std,
    )


def _conv_gn(cin: int, cout: int, stride: int = 1, groups: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(groups, cout // 4), cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """Two 3x3 conv-GroupNorm layers with an identity shortcut (a ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_gn(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(16, channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


def tiny(
    widths: Sequence[int] = (32, 64, 128, 256),
    head_features: int = 512,
    roi_size: int = 7,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
) -> Backbone:
    """A small GroupNorm CNN trained from scratch: the fast CPU default for the built-in data.

    Trunk: a stride-2 stem and ``len(widths) - 1`` stride-2 stages, each a strided conv and a
    residual block: stride ``2 ** len(widths)`` (the default four widths: 16, as VGG16's conv5;
    three widths, e.g. ``[32, 64, 128]``: stride 8, a feature cell and anchors every 8 px, for
    small objects). Head: one fully connected layer on the pooled RoI (like fc6), so the detector
    keeps the paper's structure at a fraction of VGG16's cost.
    """
    if len(widths) < 2:
        raise ValueError(f"backbone.widths: the stem's width and at least one stage's, not {list(widths)!r}")
    layers: list[nn.Module] = [_conv_gn(3, widths[0], stride=2)]
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [_conv_gn(cin, cout, stride=2), _Residual(cout)]
    trunk = nn.Sequential(*layers)
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    head = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * roi_size * roi_size, head_features), nn.ReLU(inplace=True))
    return Backbone(
        trunk=trunk,
        head=head,
        out_channels=widths[-1],
        head_out_features=head_features,
        stride=2 ** len(widths),
        roi_size=roi_size,
        mean=mean,
        std=std,
    )
