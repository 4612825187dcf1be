"""Fine-tuning: a new run whose detector starts from another run's checkpoint (``init_from=<ckpt>``).

Not a resume (``ckpt_path``): the run has its own folder, config, data and classes, a fresh
optimiser and LR schedule, and starts at step 0; only the weights come from the checkpoint.

* Every tensor of the trunk, the RPN and the RoI head's layers is copied as it is; the run's
  backbone and anchors must make the same shapes, else :class:`InitFromError` names the first
  keys that differ, their two shapes and the config values behind them.
* The class-specific layers, ``roi_head.cls_score`` (one row per class, K + 1) and
  ``roi_head.bbox_pred`` (4 rows per class), are mapped by class name: the background row (0)
  and the rows of every class that both lists have are copied (a class may sit at another
  index); the rows of this run's other classes keep the model's own initialisation (the paper's
  zero-mean Gaussian, :class:`fasterrcnn.heads.RoIHead`), and the checkpoint's classes that this
  run lacks are dropped.

The checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)`` and its
``hyper_parameters.model_cfg`` is checked whole with :func:`fasterrcnn.build.check_config`
before anything in it is looked at; nothing in it is built (the detector is this run's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fasterrcnn.build import UnsafeConfigError, check_config

log = logging.getLogger(__name__)

# The class-specific tensors of FasterRCNNModule's state dict and their rows per class
# (fasterrcnn.heads.RoIHead: cls_score (K+1, D), bbox_pred (4 (K+1), D), class k's deltas at 4k..4k+3).
CLASS_ROWS = {
    "model.roi_head.cls_score.weight": 1,
    "model.roi_head.cls_score.bias": 1,
    "model.roi_head.bbox_pred.weight": 4,
    "model.roi_head.bbox_pred.bias": 4,
}
# Config sections whose differences explain a shape mismatch (and, for the anchors, a change of
# meaning: the RPN's outputs are per anchor).
ARCH_SECTIONS = ("backbone", "anchor", "model")


class InitFromError(ValueError):
    """``init_from`` cannot initialise this run: not a checkpoint of this project, or another
    architecture (the message names the tensors, their shapes and the config that differs)."""


@dataclass
class InitReport:
    """What :func:`init_from_checkpoint` did; :meth:`to_dict` is metrics.json's ``init_from``.

    ``mapped``: this run's class -> ``[the checkpoint's label, this run's label]`` (rows copied);
    ``reinitialised``: this run's classes the checkpoint does not have (rows from the model's
    init); ``dropped``: the checkpoint's classes this run does not have.
    """

    path: str
    loaded: int  # tensors copied whole
    class_specific: list[str]  # tensors copied row by row (background and mapped classes)
    mapped: dict[str, list[int]]
    reinitialised: list[str]
    dropped: list[str]
    source_classes: list[str]
    config_differences: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "loaded": self.loaded,
            "class_specific": list(self.class_specific),
            "mapped": {k: list(v) for k, v in self.mapped.items()},
            "reinitialised": list(self.reinitialised),
            "dropped": list(self.dropped),
            "source_classes": list(self.source_classes),
        }

    def summary(self) -> str:
        """The log line: ``init_from=<path>: loaded 38 tensors whole (...); mapped by class name in
        roi_head.cls_score and roi_head.bbox_pred: background, square 2->1; re-initialised: dog;
        dropped (not in this run): star``."""
        layers = sorted({k.removeprefix("model.").rsplit(".", 1)[0] for k in self.class_specific})
        mapped = ", ".join(["background"] + [f"{name} {src}->{dst}" for name, (src, dst) in self.mapped.items()])
        return (
            f"init_from={self.path}: loaded {self.loaded} tensors whole (trunk, RPN, RoI head layers); "
            f"mapped by class name in {' and '.join(layers)}: {mapped}; "
            f"re-initialised: {', '.join(self.reinitialised) or 'none'}; "
            f"dropped (not in this run): {', '.join(self.dropped) or 'none'}"
        )


def read_detector_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model_cfg, state_dict)`` of a checkpoint of this project, read with
    ``weights_only=True`` and its model config checked (:func:`fasterrcnn.build.check_config`).

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the file carries a pickled object (nothing in it runs).
        UnsafeConfigError: the model config names a ``_target_`` outside the allowlist, or is
            not plain data.
        InitFromError: not a checkpoint of this project (no ``hyper_parameters.model_cfg`` with
            its class names, or no state dict of tensors).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from={path}: no such checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    model_cfg = hparams.get("model_cfg") if isinstance(hparams, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(state, dict):
        raise InitFromError(f"init_from={path}: not a checkpoint of this project (no hyper_parameters.model_cfg and state_dict)")
    try:
        check_config(model_cfg, "model_cfg")
    except UnsafeConfigError as err:
        raise UnsafeConfigError(f"init_from={path}: {err}") from err
    classes = model_cfg.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise InitFromError(f"init_from={path}: model_cfg.classes must be a list of distinct class names, got {str(classes)[:200]}")
    bad = [repr(k)[:80] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InitFromError(f"init_from={path}: state_dict holds non-tensor entries: {', '.join(bad[:5])}")
    return model_cfg, state


def class_mapping(source: list[str], target: list[str]) -> dict[int, int]:
    """``{this run's label: the checkpoint's label}`` for background (0) and every class in both
    lists, matched by name (labels are 1-based: ``classes[k - 1]`` is label k).

    >>> class_mapping(["circle", "square", "star"], ["square", "circle", "cross"])
    {0: 0, 1: 2, 2: 1}
    """
    index = {name: k for k, name in enumerate(source, start=1)}
    return {0: 0, **{k: index[name] for k, name in enumerate(target, start=1) if name in index}}


def _flat(cfg: object, prefix: str) -> dict[str, object]:
    if isinstance(cfg, Mapping):
        out: dict[str, object] = {}
        for key, value in cfg.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out
    return {prefix: cfg}


def config_differences(source: Mapping, target: Mapping, sections=ARCH_SECTIONS) -> list[str]:
    """``"backbone.widths: [8, 16] in the checkpoint, [32, 64] here"`` for each value of
    ``sections`` that differs between two model configs."""
    out = []
    for section in sections:
        a, b = _flat(source.get(section), section), _flat(target.get(section), section)
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<unset>") != b.get(key, "<unset>"):
                out.append(f"{key}: {a.get(key, '<unset>')!r} in the checkpoint, {b.get(key, '<unset>')!r} here")
    return out


def _mismatch(path: str, problems: list[str], differences: list[str]) -> InitFromError:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    why = f"; the config differs at {'; '.join(differences[:8])}" if differences else ""
    return InitFromError(
        f"init_from={path}: the architectures differ, {'; '.join(problems[:5])}{more}{why}. "
        "Fine-tuning copies every tensor but the class-specific ones, so this run needs the checkpoint's "
        "backbone and anchors (its config.yaml has them)"
    )


def init_from_checkpoint(module: nn.Module, path: str, model_cfg: Mapping | None = None) -> InitReport:
    """Initialise ``module`` (a :class:`fasterrcnn.lit.FasterRCNNModule`) from the detector in
    checkpoint ``path``, mapping the class-specific rows by class name (module docstring).

    Args:
        model_cfg: this run's model config (``module.hparams.model_cfg`` when None), for the
            class names and the config differences in messages.

    Raises:
        InitFromError: another architecture (a tensor missing on either side, or of another
            shape), or not a checkpoint of this project; and what :func:`read_detector_checkpoint`
            raises.
    """
    source_cfg, state = read_detector_checkpoint(path)
    model_cfg = dict(model_cfg if model_cfg is not None else module.hparams["model_cfg"])
    source, target = list(source_cfg["classes"]), list(model_cfg["classes"])
    differences = config_differences(source_cfg, model_cfg)
    own = module.state_dict()
    problems = [f"{k} is missing from the checkpoint" for k in own if k not in state]
    problems += [f"{k} is in the checkpoint, not in this model" for k in state if k not in own]
    new: dict[str, torch.Tensor] = {}
    loaded = 0
    mapping = class_mapping(source, target)
    for key, mine in own.items():
        theirs = state.get(key)
        if theirs is None:
            continue
        rows = CLASS_ROWS.get(key)
        if rows is None:
            if theirs.shape != mine.shape:
                problems.append(f"{key} is {tuple(theirs.shape)} in the checkpoint and {tuple(mine.shape)} here")
                continue
            new[key] = theirs.to(dtype=mine.dtype)
            loaded += 1
            continue
        # (rows x (K+1), ...) on both sides, the same per-class width
        if theirs.shape[0] != rows * (len(source) + 1) or theirs.shape[1:] != mine.shape[1:]:
            problems.append(
                f"{key} is {tuple(theirs.shape)} in the checkpoint ({len(source)} classes) and {tuple(mine.shape)} here ({len(target)} classes)"
            )
            continue
        out = mine.detach().clone()  # the model's own init for the rows not mapped
        for dst, src in mapping.items():
            out[dst * rows : (dst + 1) * rows] = theirs[src * rows : (src + 1) * rows].to(dtype=mine.dtype)
        new[key] = out
    if problems:
        raise _mismatch(path, problems, differences)
    module.load_state_dict(new, strict=True)
    names = {k: name for k, name in enumerate(target, start=1)}
    report = InitReport(
        path=str(path),
        loaded=loaded,
        class_specific=[k for k in own if k in CLASS_ROWS],
        mapped={names[dst]: [src, dst] for dst, src in mapping.items() if dst != 0},
        reinitialised=[name for name in target if name not in source],
        dropped=[name for name in source if name not in target],
        source_classes=source,
        config_differences=differences,
    )
    log.info(report.summary())
    if any(d.startswith("anchor.") for d in differences):
        log.warning(
            "init_from=%s: the anchors differ from the checkpoint's (%s): the RPN's per-anchor outputs are copied onto other anchors",
            path,
            "; ".join(d for d in differences if d.startswith("anchor.")),
        )
    prep_a, prep_b = source_cfg.get("preprocess") or {}, model_cfg.get("preprocess") or {}
    changed = [k for k in ("mean", "std") if k in prep_a and k in prep_b and list(prep_a[k]) != list(prep_b[k])]
    if changed:
        log.warning("init_from=%s: the input normalisation differs (%s): the checkpoint's weights saw other inputs", path, ", ".join(f"{k} {prep_a[k]} -> {prep_b[k]}" for k in changed))
    return report


def apply_init_from(module: nn.Module, init_from: str | None, resume_path: str | None) -> dict | None:
    """``init_from`` for :func:`fasterrcnn.training.train`: metrics.json's ``init_from``
    (:meth:`InitReport.to_dict`), or None when there is none to apply.

    A resume wins: with ``ckpt_path`` resolving to a checkpoint (``resume_path``), every weight,
    the optimiser and the step come from that checkpoint, so ``init_from`` is not applied (a
    fine-tuning run resumed with its own command plus ``ckpt_path=last`` goes on as it was; its
    ``init_from`` record comes back with the checkpoint's metrics.json state)."""
    if not init_from:
        return None
    if resume_path is not None:
        log.info("init_from=%s not applied: resuming from %s, which holds the weights, the optimiser and the step", init_from, resume_path)
        return None
    return init_from_checkpoint(module, str(init_from)).to_dict()
