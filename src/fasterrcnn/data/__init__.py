"""Data: the VOC-layout reader, the built-in dataset and the LightningDataModule."""

from fasterrcnn.data.datamodule import DetectionBatch, DetectionDataset, VOCDataModule, collate
from fasterrcnn.data.voc import VOC_CLASSES, DatasetError, VOCDetection

__all__ = ["VOC_CLASSES", "DatasetError", "DetectionBatch", "DetectionDataset", "VOCDataModule", "VOCDetection", "collate"]
