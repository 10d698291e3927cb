"""Options of ``sparkmim evaluate``."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigError, NormStats, opt, parse_intensity, validate

__all__ = ["EvalConfig", "MODES", "RUN_SETTINGS", "settings_from_runs", "data_channels"]

Mode = Literal["knn", "linear", "finetune", "segment"]
MODES = typing.get_args(Mode)


@dataclass
class EvalConfig:
    """Options of ``sparkmim evaluate``; each is a ``--flag`` of the same name."""

    mode: Mode = opt("knn", "knn, linear, finetune or segment")
    data: str = opt("", "labelled image folder (volumes for 3-D models): one sub-folder per class; segment: an "
                        "nnU-Net raw dataset (imagesTr/, labelsTr/) or a folder with images/ and labels/ of the same "
                        "file names")
    val: str | None = opt(None, "validation folder with the same class sub-folders, or for segment the same layout "
                                "as --data (default: a seeded split of --data)")
    val_fraction: float = opt(0.2, "fraction of each class held out for validation when --val is not given",
                              gt=0.0, lt=1.0)
    train_fraction: float = opt(1.0, "fraction of each class of the training part that is used (few-label runs)",
                                gt=0.0, le=1.0)
    model: str = opt("resnet50", "backbone: timm name, 'timm:NAME', 'torchvision:NAME' or 'monai:NAME'")
    weights: str = opt("random", "comma-separated weight sources, each 'random', 'pretrained' (timm/torchvision "
                                  "weights), or a sparkmim run folder / exported .safetensors / checkpoint; "
                                  "optionally named as NAME=SOURCE")
    in_chans: int = opt(3, "input channels the backbone takes (images: 3, 1 for grayscale, 4 for RGBA; volumes: "
                           "any number)", ge=1)
    input_size: int = opt(224, "image size in pixels", gt=0)
    input_depth: int = opt(0, "volumes (3-D models): depth the whole volume is resized to (0: input_size); "
                              "height and width: input_size", ge=0)
    intensity: str = opt("zscore", "volumes: 'zscore' or 'window:LOW:HIGH', as in pre-training")
    crop_ratio: float = opt(0.875, "evaluation images are resized to input_size / crop_ratio, then centre-cropped",
                             gt=0.0, le=1.0)
    norm_stats: NormStats = opt("imagenet", "normalisation: 'imagenet' or 'data' (computed from the training images)")
    batch_size: int = opt(0, "samples per batch (0: 64; segment: 2 crops of volumes, 8 of images)", ge=0)
    workers: int = opt(2, "data-loading worker processes", ge=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    seed: int = opt(0, "seed of the split, the random initialisation, the head and the data order")
    seeds: str = opt("", "segment: comma-separated seeds of the initialisation, head and crops, each a run of "
                         "its own; the table gives their mean and spread (default: --seed)")
    out: str = opt("runs/eval", "run folder: results.json and the per-epoch history")
    progress: bool = opt(True, "show progress bars")
    stage: str = opt("last", "knn and linear: whose pooled features are used: 'last' (the last feature map), 'all' "
                             "(each stage, a table row each), or stage numbers from 1 (the finest), e.g. '3' or '2,4'")
    bn_stats: Literal["saved", "data"] = opt("saved", "knn and linear: BatchNorm running statistics as saved "
                                                      "('saved'), or estimated again from the training images "
                                                      "('data': one pass over them, whole, without labels)")
    # k-NN
    k: str = opt("20", "k-NN: comma-separated neighbour counts")
    temperature: float = opt(0.07, "k-NN: temperature of the exp(similarity / T) vote weights")
    # linear probe and fine-tuning
    epochs: int = opt(0, "training epochs (0: 100 for linear, 20 for finetune)", ge=0)
    lr: float = opt(0.0, "peak lr (0: 1e-3 for linear; finetune: base_lr x batch / 256; segment: 1e-3 with adamw "
                         "or lamb, 1e-2 with sgd)")
    base_lr: float = opt(4e-3, "finetune: lr = base_lr x batch / 256 when --lr is 0")
    optimizer: Literal["adamw", "lamb", "sgd"] = opt("adamw", "finetune and segment: adamw or lamb; sgd (Nesterov, "
                                                              "momentum 0.99, as nnU-Net trains) for segment")
    weight_decay: float = opt(0.05, "finetune weight decay (linear probe: none)")
    warmup_epochs: float = opt(2.0, "linear lr warm-up epochs, then cosine decay (segment: a tenth of the steps)")
    label_smoothing: float = opt(0.1, "finetune: label smoothing")
    layer_decay: float = opt(0.7, "finetune: layer-wise lr decay (1: off)")
    mixup: float = opt(0.0, "finetune: mixup alpha (0: off)")
    cutmix: float = opt(0.0, "finetune: cutmix alpha (0: off)")
    drop_path: float = opt(0.0, "finetune: stochastic depth rate (models that have it: timm drop_path_rate, "
                                 "torchvision stochastic_depth_prob)", ge=0.0, lt=1.0)
    clip_grad: float = opt(0.0, "finetune: clip the global gradient norm to this value (0: off, as in the "
                                 "paper's fine-tuning recipes)", ge=0.0)
    crop_scale_min: float = opt(0.35, "finetune: RandomResizedCrop minimum area fraction (volumes: fraction of "
                                      "each axis)", gt=0.0, le=1.0)
    hflip: float = opt(0.5, "finetune: horizontal-flip probability (0 for digits and text)", ge=0.0, le=1.0)
    # segmentation
    labels: int = opt(0, "segment: train on the first N labelled cases of the training part, in name order "
                         "(few-label curves; 0: all)", ge=0)
    steps: int = opt(0, "segment: training steps (0: 300)", ge=0)
    decoder_width: int = opt(0, "segment: width of the light U-Net decoder of backbones other than nnU-Net's (0: "
                                "the deepest feature map's width)", ge=0)
    overlap: float = opt(0.5, "segment, volumes: overlap of the sliding windows of validation", ge=0.0, lt=1.0)

    def __post_init__(self):
        validate(self)
        parse_intensity(self.intensity)
        try:
            ks = self.ks
            if not ks or min(ks) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"k must be comma-separated positive integers, got '{self.k}'", ["k"]) from None
        try:
            self.seed_list()
        except ValueError:
            raise ConfigError(f"seeds must be comma-separated integers, got '{self.seeds}'", ["seeds"]) from None
        if self.mode == "finetune" and self.optimizer == "sgd":
            raise ConfigError("finetune uses adamw or lamb; sgd is for segment", ["optimizer"])

    def seed_list(self) -> list[int]:
        """The seeds of ``--seeds``, or ``[seed]``."""
        seeds = [int(v) for v in str(self.seeds).split(",") if v.strip()]
        return seeds or [self.seed]

    def batch(self, modality=None) -> int:
        """The batch size: ``batch_size``, or the mode's default (segmentation: the modality's)."""
        return self.batch_size or (modality.segment_batch if self.mode == "segment" else 64)

    def stages(self, count: int) -> list[int]:
        """The stage numbers (1 = the finest of ``count`` feature maps) that ``stage`` names."""
        if self.stage == "last":
            return [count]
        if self.stage == "all":
            return list(range(1, count + 1))
        try:
            chosen = [int(v) for v in self.stage.split(",") if v.strip()]
        except ValueError:
            chosen = []
        if not chosen or not all(1 <= v <= count for v in chosen):
            raise ConfigError(f"stage must be 'last', 'all' or stage numbers from 1 to {count} (the model's feature "
                              f"maps), got '{self.stage}'", ["stage"])
        return chosen

    @property
    def ks(self) -> list[int]:
        return [int(v) for v in str(self.k).split(",") if v.strip()]

    @property
    def sources(self) -> list[tuple[str, str]]:
        """``[(label, source)]`` from ``--weights``."""
        out = []
        for item in (s.strip() for s in self.weights.split(",")):
            if not item:
                continue
            label, _, source = item.rpartition("=")
            out.append((label or _short(source), source))
        if not out:
            raise ConfigError("weights names no weight source", ["weights"])
        return out

    def train_epochs(self) -> int:
        return self.epochs or (100 if self.mode == "linear" else 20)


def _short(source: str) -> str:
    if source in ("random", "pretrained"):
        return source
    p = Path(source)
    return p.parent.name if p.name in ("encoder.safetensors",) else p.stem if p.is_file() else p.name


# what a run's config.yaml gives an evaluation that does not name a model
RUN_SETTINGS = ("model", "in_chans", "input_size", "input_depth", "intensity")


def settings_from_runs(weights: str) -> dict:
    """The model, channels, input size (and for volumes depth and intensity) of the sparkmim runs
    among the ``--weights`` sources: a run folder, or a file inside one (``encoder.safetensors``,
    a checkpoint), read from the run's ``config.yaml``. Empty when no source is a run; runs of
    different models are refused."""
    import yaml

    found: dict[str, dict] = {}
    for item in (s.strip() for s in weights.split(",")):
        source = Path(item.rpartition("=")[2])
        run = source if source.is_dir() else source.parent
        if item and source.exists() and (run / "config.yaml").is_file():
            saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
            found[str(run)] = {k: saved[k] for k in RUN_SETTINGS if k in saved}
    models = {str(v.get("model")) for v in found.values()}
    if len(models) > 1:
        raise ConfigError(f"the runs in weights were pre-trained with different models ({', '.join(sorted(models))}); "
                          f"name the one to evaluate with model", ["weights", "model"])
    return next(iter(found.values()), {})


def data_channels(data: str) -> int | None:
    """The channel count a labelled data set declares (an nnU-Net raw dataset's ``dataset.json``),
    or None."""
    from ..inputs import data_input
    from ..modality import VOLUMES

    try:
        source = data_input(data)
    except (ValueError, OSError):  # not a data set sparkmim recognises: the evaluation says why
        return None
    return VOLUMES.data_channels(source)
