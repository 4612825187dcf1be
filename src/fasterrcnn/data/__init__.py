"""Data: the VOC-layout and COCO readers, the built-in dataset, the batch type, the dataset and the
LightningDataModule."""

from fasterrcnn.data.batch import DetectionBatch, collate
from fasterrcnn.data.coco import COCODetection
from fasterrcnn.data.datamodule import VOCDataModule
from fasterrcnn.data.dataset import DetectionDataset
from fasterrcnn.data.voc import PROBLEM_KINDS, VOC_CLASSES, DatasetError, Problem, VOCDetection

__all__ = ["PROBLEM_KINDS", "VOC_CLASSES", "COCODetection", "DatasetError", "Problem", "DetectionBatch", "DetectionDataset", "VOCDataModule", "VOCDetection", "collate"]
