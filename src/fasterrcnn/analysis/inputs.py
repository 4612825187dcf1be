"""What the analysis tools read: a split of the configured data, its images unflipped and prepared
with a given preprocessing (:func:`fasterrcnn.data.transforms.prepare`, as in training)."""

from __future__ import annotations

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fasterrcnn.build import build_datamodule
from fasterrcnn.data import DatasetError, DetectionDataset
from fasterrcnn.data.transforms import Preprocess

SETUP_STAGE = {"train": "fit", "val": "validate", "test": "test"}

# What the tools raise for a wrong command line, config or data (a bad override, a config value
# of the wrong type, an unreadable dataset, an index out of range, a refused ``_target_``: all
# ValueError or these); the scripts print it as one ``error:`` line instead of a traceback.
INPUT_ERRORS = (HydraException, OmegaConfBaseException, DatasetError, ValueError)


def load_split(cfg: DictConfig, split: str, spec: Preprocess | None = None) -> DetectionDataset:
    """Split ``split`` ("train", "val" or "test") of ``cfg.data`` (the built-in data generated
    when missing, every sample checked by the DataModule), its images prepared with ``spec`` (a
    model's :attr:`~fasterrcnn.model.FasterRCNN.preprocess`; default the data config's) and
    nothing else: not flipped, not augmented, the images as they are."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup(SETUP_STAGE[split])
    dataset = datamodule.datasets[split]
    spec = spec or dataset.preprocess
    return DetectionDataset(dataset.voc, spec.min_size, spec.max_size, spec.mean, spec.std, stage=split)


def item_at(dataset: DetectionDataset, index: int) -> dict:
    """Item ``index`` of ``dataset``; ValueError naming the split when it is out of range."""
    if not 0 <= index < len(dataset):
        raise ValueError(f"--index {index} is out of range: the {dataset.stage} split has {len(dataset)} images")
    return dataset[index]
