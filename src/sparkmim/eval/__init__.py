"""Downstream evaluation of a backbone on a labelled folder of images or volumes: k-NN, linear probe, fine-tuning."""

from .config import MODES, EvalConfig
from .data import LabelledSamples, build_splits, scan_classes, split_samples
from .finetune import PooledClassifier, build_classifier, finetune, layer_decay_groups
from .probes import extract_features, knn_accuracy, linear_probe
from .run import build_backbone, evaluate, format_table

__all__ = ["EvalConfig", "MODES", "LabelledSamples", "build_splits", "scan_classes", "split_samples",
           "PooledClassifier", "build_classifier", "finetune", "layer_decay_groups", "extract_features",
           "knn_accuracy", "linear_probe", "build_backbone", "evaluate", "format_table"]
