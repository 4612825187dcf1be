"""Shared fixtures: the real Hydra config, composed with small data and a temporary output dir."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fasterrcnn import build

CONF_DIR = str(build.CONF_DIR)

# A small built-in dataset shared by the tests (generated once per session).
SMALL_DATA = [
    "data.builtin.num_train=24",
    "data.builtin.num_val=8",
    "data.builtin.num_test=8",
    "data.builtin.num_test_shift=8",
    "data.num_workers=0",
]
# Training runs of the tests validate after every epoch (the default run: every second one; the
# tests' runs are an epoch or two long).
EVERY_EPOCH = ["trainer.check_val_every_n_epoch=1"]


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    """``make_cfg([...overrides])``: the real training config on small data, writing to tmp_path."""

    def _make(overrides: list[str] | None = None, small_data: bool = True) -> DictConfig:
        base = [f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}", "logger=none", *EVERY_EPOCH]
        return compose_config(base + (SMALL_DATA if small_data else []) + list(overrides or []))

    return _make


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    os.environ.setdefault("WANDB_SILENT", "true")
    yield
