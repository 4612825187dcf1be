"""Building the objects of a run from its (Hydra) config: one place for the wiring."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fasterrcnn.data.augment import build_augment, eval_min_size
from fasterrcnn.data.datamodule import VOCDataModule
from fasterrcnn.data.transforms import Preprocess
from fasterrcnn.model import FasterRCNN

# The repository's Hydra config tree (scripts and tests run from a checkout).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The config nodes that define the detector; a checkpoint stores them to rebuild it anywhere.
MODEL_KEYS = ("backbone", "anchor", "sampler", "model")

# The only ``_target_``s a model config may name: the builders of the conf/ groups backbone,
# anchor, sampler and model. A checkpoint (or a run's config.yaml) is data: Hydra would call
# whatever it names (``pathlib.Path.write_text``, ``builtins.open``...), so nothing else is built.
ALLOWED_TARGETS = frozenset(
    {
        "fasterrcnn.model.FasterRCNN",
        "fasterrcnn.backbones.vgg16",
        "fasterrcnn.backbones.resnet_c4",
        "fasterrcnn.backbones.tiny",
        "fasterrcnn.anchors.AnchorGenerator",
        "fasterrcnn.boxes.BoxCoder",
        "fasterrcnn.creators.AnchorTargetCreator",
        "fasterrcnn.creators.ProposalCreator",
        "fasterrcnn.creators.ProposalTargetCreator",
    }
)
# The only ``_target_``s of ``optim.optimizer`` (conf/optim/*.yaml, ``_partial_`` nodes): a
# checkpoint's ``hyper_parameters.optim`` is data too (fasterrcnn.lit.FasterRCNNModule).
OPTIMIZER_TARGETS = frozenset({"torch.optim.SGD", "torch.optim.AdamW"})
# What a config read from disk may hold besides dicts and lists (exact types: no subclasses).
PLAIN_TYPES = (str, int, float, bool, type(None))


class UnsafeConfigError(ValueError):
    """A config (or a checkpoint's) names a ``_target_`` outside :data:`ALLOWED_TARGETS`, or holds
    something other than plain data; the message gives the dotted key and the value."""


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


def to_container(cfg: Mapping | DictConfig) -> dict:
    """A plain, resolved dict (safe to store in a checkpoint loaded with ``weights_only=True``)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return copy.deepcopy(dict(cfg))


def model_config(cfg: DictConfig) -> dict:
    """The detector's config: backbone, anchor, sampler, model, the class names and the
    preprocessing (``data.max_size``/``mean``/``std`` and the one test size,
    :func:`fasterrcnn.data.augment.eval_min_size` of ``data.min_size`` and
    ``data.test_min_size``), so a checkpoint alone says how to prepare an image for it.

    The anchors are plain scales and ratios: ``train`` fits an ``anchor=auto`` node first
    (:mod:`fasterrcnn.analysis.anchor_fit`); unfitted, it stands for its starting values, with
    a warning (:func:`~fasterrcnn.analysis.anchor_fit.model_anchor`)."""
    from fasterrcnn.analysis.anchor_fit import model_anchor

    out = {key: to_container(cfg[key]) for key in MODEL_KEYS}
    out["anchor"] = model_anchor(out["anchor"])
    out["classes"] = list(cfg.data.classes)
    spec = {key: to_value(cfg.data[key]) for key in ("max_size", "mean", "std")}
    spec["min_size"] = eval_min_size(to_value(cfg.data.min_size), to_value(cfg.data.get("test_min_size")))
    out["preprocess"] = Preprocess.from_dict(spec).to_dict()
    return out


def to_value(value: object) -> object:
    """A config value as plain Python (lists for list nodes)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_config(cfg: object, where: str, allowed: frozenset[str] = ALLOWED_TARGETS) -> None:
    """Refuse ``cfg`` unless it is plain data whose every ``_target_`` is in ``allowed``.

    The whole tree is walked (dicts, lists, ``_args_`` and targets nested anywhere), so nothing is
    built from a config that names anything else. Also refused: a value other than dict, list,
    str, int, float, bool or None, a non-string key, and an interpolation (``${...}``, which
    Hydra would resolve while instantiating; a stored config is already resolved).

    Args:
        where: the dotted key of ``cfg`` for the message (e.g. ``model_cfg``).
        allowed: the ``_target_`` values that may be built (a caller building other objects,
            say an optimiser, passes its own small set).

    Raises:
        UnsafeConfigError: naming the first offending key (``model_cfg.backbone._target_``,
            ``model_cfg.model._args_[0]._target_``) and its value.
    """
    if isinstance(cfg, dict):
        if "_target_" in cfg:
            target = cfg["_target_"]
            if type(target) is not str or target not in allowed:
                raise UnsafeConfigError(
                    f"{where}._target_={_short(target)}: refused, not one of this project's builders"
                    f" (a config or checkpoint read from disk may only name {', '.join(sorted(allowed))})"
                )
        for key, value in cfg.items():
            if type(key) is not str:
                raise UnsafeConfigError(f"{where}: key {_short(key)} is not a string")
            check_config(value, f"{where}.{key}", allowed)
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            check_config(value, f"{where}[{i}]", allowed)
    elif type(cfg) not in PLAIN_TYPES:
        raise UnsafeConfigError(f"{where}={_short(cfg)}: refused, a {type(cfg).__name__} is not plain config data (dict, list, str, int, float, bool, None)")
    elif isinstance(cfg, str) and "${" in cfg:
        raise UnsafeConfigError(f"{where}={_short(cfg)}: refused, an interpolation (a stored config holds resolved values only)")


def safe_instantiate(node: dict, where: str, allowed: frozenset[str] = ALLOWED_TARGETS, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)`` once :func:`check_config` accepts ``node``, which
    must name a ``_target_`` (a node without one would come back as a config, not an object).
    ``kwargs`` are objects the caller built, not config data."""
    check_config(node, where, allowed)
    if not isinstance(node, dict) or "_target_" not in node:
        raise UnsafeConfigError(f"{where}: expected a node with a _target_ (one of {', '.join(sorted(allowed))}), got {_short(node)}")
    return instantiate(node, **kwargs)


def upgrade_model_config(cfg: Mapping) -> dict:
    """A model config of an older checkpoint in today's layout: the RoI targets' normalisation
    moved from ``sampler.proposal_target.loc_normalize_mean/std`` to the RoI head's box coder
    (``model.roi_box_coder``)."""
    cfg = copy.deepcopy(dict(cfg))
    ptc = cfg.get("sampler", {}).get("proposal_target", {})
    if "loc_normalize_mean" in ptc or "loc_normalize_std" in ptc:
        mean = ptc.pop("loc_normalize_mean", [0.0, 0.0, 0.0, 0.0])
        std = ptc.pop("loc_normalize_std", [0.1, 0.1, 0.2, 0.2])
        cfg["model"] = {**cfg["model"], "roi_box_coder": {"_target_": "fasterrcnn.boxes.BoxCoder", "mean": mean, "std": std}}
    return cfg


def build_model(cfg: Mapping, pretrained: bool | None = None, where: str = "model_cfg") -> FasterRCNN:
    """The detector described by :func:`model_config`'s dict, built only from
    :data:`ALLOWED_TARGETS`: the whole config is checked (:func:`check_config`) before anything
    is instantiated.

    Args:
        pretrained: False when the weights will come from a checkpoint anyway: the backbone is
            built as configured but its ImageNet weights are not fetched.
        where: the name of ``cfg`` in error messages.

    Raises:
        UnsafeConfigError: a ``_target_`` outside the allowlist, or a value that is not plain data.
    """
    check_config(cfg, where)
    cfg = upgrade_model_config(cfg)
    backbone_cfg = dict(cfg["backbone"])
    if pretrained is False and backbone_cfg.get("pretrained"):
        # the same network (a pretrained ResNet has frozen BatchNorm, one from scratch GroupNorm),
        # only the ImageNet weights are not fetched: the checkpoint has them
        backbone_cfg["load_weights"] = False
    sampler = cfg["sampler"]
    # Checkpoints written before the preprocessing travelled with the weights have none: the
    # model then takes the backbone's mean/std and the paper's sizes (callers give the sizes).
    preprocess = Preprocess.from_dict(cfg["preprocess"]).to_dict() if cfg.get("preprocess") is not None else None
    return safe_instantiate(
        cfg["model"],
        f"{where}.model",
        preprocess=preprocess,
        backbone=safe_instantiate(backbone_cfg, f"{where}.backbone"),
        num_classes=len(cfg["classes"]),
        anchor_generator=safe_instantiate(cfg["anchor"], f"{where}.anchor"),
        anchor_target_creator=safe_instantiate(sampler["anchor_target"], f"{where}.sampler.anchor_target"),
        proposal_creator=safe_instantiate(sampler["proposal"], f"{where}.sampler.proposal"),
        proposal_target_creator=safe_instantiate(sampler["proposal_target"], f"{where}.sampler.proposal_target"),
    )


def build_datamodule(cfg: DictConfig) -> VOCDataModule:
    """``cfg.data``'s DataModule, with the training augmentation of ``cfg.augment`` (built from
    :data:`fasterrcnn.data.augment.ALLOWED_TARGETS` only) and the run's seed, when ``cfg`` has
    them (a training config; ``src/eval.py``'s has neither)."""
    extra = {}
    if cfg.get("augment") is not None:
        extra["augment"] = build_augment(cfg.augment)
    if cfg.get("seed") is not None:
        extra["seed"] = int(cfg.seed)
    return instantiate(cfg.data, _convert_="all", **extra)
