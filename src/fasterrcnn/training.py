"""``train(cfg)``: one training run from a composed config. ``src/train.py`` is a thin Hydra
entry point around it; tests call it directly with a composed config."""

from __future__ import annotations

import logging
import netrc
import os

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fasterrcnn.build import build_datamodule, model_config
from fasterrcnn.callbacks import instantiate_callbacks
from fasterrcnn.checkpointing import AtomicCheckpointIO
from fasterrcnn.dashboards import DashboardPanels
from fasterrcnn.data import VOCDataModule
from fasterrcnn.finetune import apply_init_from
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.threads import set_threads
from fasterrcnn.metrics_file import MetricsFile, write_json
from fasterrcnn.resume import ExactResume

log = logging.getLogger(__name__)

# cfg.selection: what picks metrics.json's `best` and the best checkpoint (README "Model selection")
SELECTION = ("val", "none")


def monitor_of(selection: str) -> str | None:
    """The metric that picks the best checkpoint and metrics.json's ``best``: ``val/map``, or None
    under ``selection=none`` (the latest validated weights; ``best`` = ``final``). An unknown
    ``selection`` is refused by :func:`selected_on`, once metrics.json exists to record it."""
    return None if selection == "none" else "val/map"


def selected_on(selection: str, datamodule: VOCDataModule) -> dict | None:
    """metrics.json's ``selected_on`` under ``selection`` (null for "none"), warning when the
    validation sets are the test sets, so that `best` is chosen on test."""
    if selection not in SELECTION:
        raise ValueError(f"selection must be one of {', '.join(SELECTION)}, not {selection!r}")
    if selection == "none":
        return None
    if datamodule.val_is_test:
        log.warning(
            "selection=val on %s, which is also the test split: `best` and the best checkpoint are chosen on test "
            "(optimistic); report `final`, or set selection=none or data.val_holdout=0.05",
            ", ".join(datamodule.set_names("val")),
        )
    return {"sets": datamodule.set_names("val"), "is_test": datamodule.val_is_test}


def wandb_has_credentials() -> bool:
    """True when wandb could sync online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def hydra_run_info() -> tuple[list[str], str | None, str | None]:
    """The run's command-line overrides, a run name made from them and, in a multirun, a group
    shared by all jobs of the sweep."""
    if not HydraConfig.initialized():
        return [], None, None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    name = hc.job.override_dirname or hc.job.name
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = os.path.basename(os.path.normpath(hc.sweep.dir))
        name = f"{hc.job.num}:{name}"
    return overrides, name, group


def build_loggers(cfg: DictConfig, output_dir: str, name: str | None, group: str | None) -> list[Logger]:
    """Instantiate ``cfg.logger`` (a dict of loggers; empty for ``logger=none``).

    wandb runs offline when no credentials are found (or ``logger.wandb.offline=true``), keeping
    its folder inside the run's output directory. The wandb run itself starts when something is
    first logged (``WandbLogger.experiment``), and is closed by :func:`finish_wandb`.
    """
    loggers = []
    for key, node in (cfg.logger or {}).items():
        if node is None:
            continue
        kwargs = {}
        if key == "wandb":
            offline = node.get("offline")
            kwargs = {
                "offline": (not wandb_has_credentials()) if offline is None else bool(offline),
                "save_dir": output_dir,
                "name": node.get("name") or name,
                "group": node.get("group") or group,
            }
        loggers.append(instantiate(node, **kwargs))
    return loggers


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``ckpt_path``: null, a checkpoint file, ``last``: this run folder's
    ``checkpoints/last.ckpt`` (a resumed run goes on in the folder of the interrupted one), or
    ``auto``: that file when it exists, else a fresh start (a requeued SLURM job)."""
    if ckpt_path is None:
        return None
    path = os.path.join(output_dir, "checkpoints", "last.ckpt") if ckpt_path in ("last", "auto") else str(ckpt_path)
    if ckpt_path == "auto":
        return path if os.path.isfile(path) else None
    if not os.path.isfile(path):
        hint = ""
        if ckpt_path == "last":
            hint = "; ckpt_path=last resumes a run in its own folder: add hydra.run.dir=<that run's folder> (e.g. outputs/runs/<date>/<time>)"
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: {path} not found{hint}")
    return path


def train(cfg: DictConfig, started: float | None = None) -> dict:
    """Train and validate Faster R-CNN as ``cfg`` says; returns the contents of ``metrics.json``.

    ``started``: when this run began (epoch seconds; ``src/train.py``: its first line), from which
    ``metrics.json``'s ``time_s`` counts ``startup`` and ``total``; default: the process's start.

    Writes into ``cfg.paths.output_dir``: ``config.yaml`` (resolved), ``checkpoints/`` (best by
    ``val/map``, or the latest under ``selection=none``, and last), the loggers' folders and ``metrics.json``.
    """
    output_dir = cfg.paths.output_dir
    os.makedirs(output_dir, exist_ok=True)
    # Under DDP every process runs this function; only rank 0 writes the run's files (metrics.json:
    # MetricsFile). Before the Trainer exists the rank comes from the launcher's environment.
    if rank_zero_only.rank == 0:
        OmegaConf.save(cfg, os.path.join(output_dir, "config.yaml"), resolve=True)
    overrides, name, group = hydra_run_info()
    selection = cfg.get("selection", "val")
    monitor = monitor_of(selection)
    # conf/callbacks/default.yaml, with what only this run knows
    callbacks = instantiate_callbacks(
        cfg.get("callbacks"),
        runtime={"metrics_file": {"monitor": monitor, "overrides": overrides}, "best_checkpoint": {"monitor": monitor}},
    )
    metrics = next((cb for cb in callbacks.values() if isinstance(cb, MetricsFile)), None)
    if metrics is None:
        raise ValueError("callbacks: a fasterrcnn.metrics_file.MetricsFile is required (train() returns metrics.json; sweeps read it)")
    if started is not None:
        metrics.process_start = started
    metrics.write()
    loggers: list[Logger] = []
    threads_before = torch.get_num_threads()
    try:
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        metrics.data["resumed_from"] = ckpt_path
        L.seed_everything(cfg.seed, workers=True)
        # threads=auto leaves the cores other processes keep busy to them (fasterrcnn.threads)
        metrics.data["threads"] = set_threads(cfg.get("threads", "auto"))
        log.info("%d CPU thread(s) for this run (threads=%s)", metrics.data["threads"], cfg.get("threads", "auto"))
        datamodule = build_datamodule(cfg)
        # anchor=auto: scales and ratios fitted to the training boxes before the model is built
        # (a resumed run takes its checkpoint's); config.yaml is written again with them.
        from fasterrcnn.analysis.anchor_fit import fit_config

        anchor_fit = fit_config(cfg, datamodule, ckpt_path)
        if anchor_fit is not None:
            metrics.data["anchor_fit"] = anchor_fit
            if rank_zero_only.rank == 0:
                OmegaConf.save(cfg, os.path.join(output_dir, "config.yaml"), resolve=True)
        metrics.data["selected_on"] = selected_on(selection, datamodule)
        module = FasterRCNNModule(
            model_config(cfg),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            use_07_metric=cfg.use_07_metric,
            evaluation=OmegaConf.to_container(cfg.evaluation, resolve=True) if cfg.get("evaluation") else None,
            on_nonfinite_loss=cfg.fault.on_nonfinite_loss,
        )
        # init_from: this new run starts from another run's weights, classes mapped by name
        # (fasterrcnn.finetune); a resume (ckpt_path) wins
        metrics.data["init_from"] = apply_init_from(module, cfg.get("init_from"), ckpt_path)
        # Exact resume: the RNG states and the data position go into every checkpoint; the
        # training loader starts where the checkpoint left it.
        resume = next((cb for cb in callbacks.values() if isinstance(cb, ExactResume)), None)
        datamodule.resume_position, datamodule.resume_seed = resume, cfg.seed
        loggers = build_loggers(cfg, output_dir, name, group)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        # Lightning refuses a LearningRateMonitor without a logger.
        active = [cb for cb in callbacks.values() if loggers or not isinstance(cb, LearningRateMonitor)]
        trainer: L.Trainer = instantiate(
            cfg.trainer, logger=loggers or False, callbacks=active, default_root_dir=output_dir, plugins=[AtomicCheckpointIO()]
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.interrupted:
            return metrics.data
        # Stopped between validations (max_steps, limit_train_batches): validate the final weights.
        if metrics.data["final"].get("step") != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        for cb in active:
            if isinstance(cb, DashboardPanels):
                cb.log_pr_curves(trainer, module)
        metrics.write(trainer, status="completed")
        return metrics.data
    except BaseException as err:
        if metrics.data["status"] == "running":
            interrupted = isinstance(err, KeyboardInterrupt)
            metrics.write(status="interrupted" if interrupted else "failed", error=None if interrupted else repr(err))
        raise
    finally:
        torch.set_num_threads(threads_before)  # train() is also a library call (tests, sweeps in one process)
        if any(isinstance(lg, WandbLogger) for lg in loggers):
            finish_wandb()


def finish_wandb() -> None:
    """Close this process's wandb run (so multirun jobs never merge) and say how to sync an
    offline one. ``wandb.run`` is None when nothing was logged (no run was started)."""
    import wandb

    run = wandb.run
    offline, run_dir = (run.offline, run.dir) if run is not None else (False, None)
    wandb.finish()
    if offline and run_dir:
        print(f"wandb ran offline; to upload this run: wandb sync {os.path.dirname(run_dir)}", flush=True)


__all__ = ["train", "write_json"]
