"""The LightningModule's optimiser rules, training targets, the DataModule's per-stage transforms
and the default wandb logger."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from fasterrcnn.build import UnsafeConfigError, build_datamodule, model_config
from fasterrcnn.data import collate
from fasterrcnn.lit import FasterRCNNModule, training_targets
from fasterrcnn.training import train

from .conftest import compose_config

TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]


def _module(overrides=(), optim="sgd"):
    cfg = compose_config(["paths.output_dir=/tmp/unused", f"optim={optim}", *TINY_NET, *overrides])
    return FasterRCNNModule(model_config(cfg), optim=OmegaConf.to_container(cfg.optim, resolve=True))


def test_sgd_is_the_reference_recipe_biases_get_double_lr_and_no_weight_decay():
    """experiment=voc07_vgg16's optimiser, number for number (simple-faster-rcnn-pytorch)."""
    cfg = compose_config(["paths.output_dir=/tmp/unused", "experiment=voc07_vgg16", "backbone=tiny", *TINY_NET])
    module = FasterRCNNModule(model_config(cfg), optim=OmegaConf.to_container(cfg.optim, resolve=True))
    module.trainer = SimpleNamespace(num_training_batches=10, world_size=1)  # 10 steps per epoch
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    weights, biases = optimizer.param_groups
    assert type(optimizer) is torch.optim.SGD
    assert weights["momentum"] == biases["momentum"] == 0.9 and weights["foreach"] is True
    assert weights["nesterov"] is False and weights["dampening"] == 0
    assert (weights["initial_lr"], weights["weight_decay"]) == (1e-3, 5e-4)
    assert (biases["initial_lr"], biases["weight_decay"]) == (2e-3, 0.0)
    assert all(p.ndim == 1 for p in biases["params"]) and len(weights["params"]) > 0
    assert len(weights["params"]) + len(biases["params"]) == len(list(module.model.parameters()))
    # x0.1 after epoch 10 (0-based: from step 100 on at 10 steps an epoch), no warm-up
    schedule = configured["lr_scheduler"]
    assert schedule["interval"] == "step"
    assert [module._lr_factor(step) for step in (0, 99, 100, 139)] == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_default_run_optimizer_is_adamw_with_its_betas():
    optimizer = _module(optim="adamw").configure_optimizers()["optimizer"]
    weights, biases = optimizer.param_groups
    assert type(optimizer) is torch.optim.AdamW and tuple(weights["betas"]) == tuple(biases["betas"]) == (0.9, 0.999)
    assert (weights["initial_lr"], weights["weight_decay"]) == (1e-3, 1e-4)
    assert (biases["initial_lr"], biases["weight_decay"]) == (1e-3, 0.0)
    assert weights["fused"] is True and weights["eps"] == 1e-8


def test_lr_scales_with_the_number_of_ddp_processes():
    module = _module()
    module.trainer = SimpleNamespace(num_training_batches=10, world_size=4)
    weights, biases = module.configure_optimizers()["optimizer"].param_groups
    assert (weights["initial_lr"], biases["initial_lr"]) == pytest.approx((4e-3, 8e-3))
    module = _module(["optim.scale_lr_with_world_size=false"])
    module.trainer = SimpleNamespace(num_training_batches=10, world_size=4)
    assert module.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == 1e-3


def test_step_decay_at_the_configured_epoch_after_warmup():
    module = _module(["optim.lr_decay_epochs=[2]", "optim.warmup_steps=4"])
    module.trainer = SimpleNamespace(num_training_batches=10)  # 10 steps per epoch
    factors = [module._lr_factor(step) for step in (0, 3, 19, 20, 35)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 0.1, 0.1])


def test_an_optimizer_outside_the_allowlist_is_refused():
    with pytest.raises(UnsafeConfigError, match=r"optim\.optimizer\._target_='torch\.optim\.RMSprop': refused"):
        _module(["optim.optimizer._target_=torch.optim.RMSprop"]).configure_optimizers()


def test_an_incomplete_optim_config_names_what_is_missing():
    with pytest.raises(ValueError, match="optim: missing bias_lr_factor"):
        _module(["~optim.bias_lr_factor"]).configure_optimizers()


def test_difficult_objects_are_left_out_of_training_targets():
    item = {
        "image": torch.zeros(3, 8, 8),
        "boxes": torch.tensor([[0.0, 0, 4, 4], [2.0, 2, 6, 6]]),
        "labels": torch.tensor([1, 2]),
        "difficult": torch.tensor([False, True]),
        "original_boxes": torch.zeros(2, 4),
        "original_size": (8, 8),
        "image_id": "x",
    }
    boxes, labels = training_targets(collate([item]))
    assert labels[0].tolist() == [1] and boxes[0].tolist() == [[0.0, 0, 4, 4]]


def test_datamodule_flips_only_in_training_and_normalises_for_the_backbone(tmp_path):
    cfg = compose_config([f"paths.data_dir={tmp_path}", "data.builtin.num_train=2", "data.builtin.num_val=1", "data.builtin.num_test=1", "data.builtin.num_test_shift=0", "augment=paper", "augment.hflip=1.0"])
    assert list(cfg.data.mean) == list(cfg.backbone.mean) and list(cfg.data.std) == list(cfg.backbone.std)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    train_item, val_item = dm.datasets["train"][0], dm.datasets["val"][0]
    raw = dm.datasets["train"].voc[0]
    (height, width), (h0, w0) = train_item["image"].shape[-2:], raw["image"].shape[-2:]
    x1, y1, x2, y2 = (raw["boxes"] * torch.tensor([width / w0, height / h0] * 2)).unbind(1)
    flipped = torch.stack([width - x2, y1, width - x1, y2], 1)
    torch.testing.assert_close(train_item["boxes"], flipped, atol=1e-3, rtol=0)
    assert dm.datasets["val"].flip_prob == 0.0 and val_item["image"].dtype == torch.float32


def test_default_wandb_logger_runs_offline_in_the_run_folder(make_cfg, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(Path(make_cfg().paths.output_dir).parent))  # no ~/.netrc
    cfg = make_cfg([*TINY_NET, "logger=wandb", "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.max_epochs=1"])
    assert train(cfg)["status"] == "completed"
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert f"wandb sync {runs[0]}" in capsys.readouterr().out
