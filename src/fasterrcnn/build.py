"""Building the objects of a run from its (Hydra) config: one place for the wiring."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fasterrcnn.data.datamodule import VOCDataModule
from fasterrcnn.model import FasterRCNN

# The repository's Hydra config tree (scripts and tests run from a checkout).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The config nodes that define the detector; a checkpoint stores them to rebuild it anywhere.
MODEL_KEYS = ("backbone", "anchor", "sampler", "model")


def compose_config(
    overrides: Sequence[str], output_dir: str | Path, return_hydra_config: bool = False, pretrained: bool | None = None
) -> DictConfig:
    """``conf/train.yaml`` composed from Python with command-line style ``overrides``, as the
    scripts need it: ``paths.output_dir`` (otherwise Hydra's runtime folder) is ``output_dir``
    unless an override sets it; ``pretrained`` (when given) replaces ``backbone.pretrained``, e.g.
    False for tools that need only the shapes, never the ImageNet weights."""
    overrides = list(overrides)
    if not any(o.lstrip("+~").startswith("paths.output_dir=") for o in overrides):
        overrides.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=return_hydra_config)
    if pretrained is not None and "pretrained" in cfg.backbone:
        cfg.backbone.pretrained = pretrained
    return cfg


def parse_script_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """A script's own ``--options`` and, everything else, Hydra overrides of ``conf/train.yaml``;
    an unknown ``--option`` is an error rather than a silently ignored override."""
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognised option(s): {' '.join(unknown)} (everything else must be a Hydra override key=value)")
    return args, overrides


def to_container(cfg: Mapping | DictConfig) -> dict:
    """A plain, resolved dict (safe to store in a checkpoint loaded with ``weights_only=True``)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return copy.deepcopy(dict(cfg))


def model_config(cfg: DictConfig) -> dict:
    """The detector's config: backbone, anchor, sampler, model and the class names."""
    out = {key: to_container(cfg[key]) for key in MODEL_KEYS}
    out["classes"] = list(cfg.data.classes)
    return out


def build_model(cfg: Mapping, pretrained: bool | None = None) -> FasterRCNN:
    """The detector described by :func:`model_config`'s dict.

    Args:
        pretrained: override ``backbone.pretrained`` (False when the weights will come from a
            checkpoint anyway, so no ImageNet download is attempted).
    """
    backbone_cfg = dict(cfg["backbone"])
    if pretrained is not None and "pretrained" in backbone_cfg:
        backbone_cfg["pretrained"] = pretrained
    sampler = cfg["sampler"]
    return instantiate(
        cfg["model"],
        backbone=instantiate(backbone_cfg),
        num_classes=len(cfg["classes"]),
        anchor_generator=instantiate(cfg["anchor"]),
        anchor_target_creator=instantiate(sampler["anchor_target"]),
        proposal_creator=instantiate(sampler["proposal"]),
        proposal_target_creator=instantiate(sampler["proposal_target"]),
    )


def build_datamodule(cfg: DictConfig) -> VOCDataModule:
    return instantiate(cfg.data, _convert_="all")
