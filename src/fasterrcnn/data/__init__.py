"""Data: the VOC-layout reader, the built-in dataset and the LightningDataModule."""

from fasterrcnn.data.datamodule import DetectionBatch, DetectionDataset, VOCDataModule, collate
from fasterrcnn.data.voc import PROBLEM_KINDS, VOC_CLASSES, DatasetError, Problem, VOCDetection

__all__ = ["PROBLEM_KINDS", "VOC_CLASSES", "DatasetError", "Problem", "DetectionBatch", "DetectionDataset", "VOCDataModule", "VOCDetection", "collate"]
