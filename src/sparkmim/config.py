"""Typed pre-training configuration: defaults from the paper, YAML files, command-line overrides."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["PretrainConfig", "load_config", "add_config_arguments", "config_from_args", "ConfigError"]


class ConfigError(ValueError):
    """An invalid configuration value, with a message that says what to do."""


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PretrainConfig:
    # data
    data: str | None = _opt(None, "image folder (searched recursively) or a text file listing image paths; "
                                  "empty: the built-in demo photographs")
    input_size: int = _opt(224, "crop size in pixels (a multiple of the encoder's total stride)", gt=0)
    in_chans: int = _opt(3, "image channels: 3 (RGB), 1 (grayscale) or 4 (RGBA)")
    norm_stats: str = _opt("imagenet", "normalisation: 'imagenet', or 'data' to compute mean/std from the images")
    crop_scale_min: float = _opt(0.67, "RandomResizedCrop minimum area fraction", gt=0.0, le=1.0)
    max_bad_fraction: float = _opt(0.5, "stop when more than this fraction of the distinct image files read so far "
                                        "are unreadable", ge=0.0, le=1.0)
    demo_length: int = _opt(512, "images per epoch when using the demo photographs", ge=1)
    workers: int = _opt(2, "data-loading worker processes", ge=0)
    fast_decode: bool = _opt(True, "JPEGs: decode at 1/2-1/8 scale when even the smallest crop stays larger than "
                                   "input_size (draft mode), else with torchvision's decoder")
    # model
    model: str = _opt("resnet50", "backbone: timm name, 'timm:NAME' or 'torchvision:NAME'")
    mask_ratio: float = _opt(0.6, "fraction of patches masked", gt=0.0, lt=1.0)
    decoder_width: int = _opt(768, "decoder width (halved per upsampling block)", ge=1)
    densify_norm: str = _opt("auto", "densify norm: auto, bn, ln or none")
    hierarchical: bool = _opt(True, "decode from all scales (False: coarsest only)")
    sparse: bool = _opt(True, "sparse encoder (False: zero-out masking ablation)")
    sparse_impl: str = _opt("fast", "sparse encoder implementation: 'fast' (visible sites only) or 'reference' "
                                    "(dense then mask); same results")
    pos_embed: bool = _opt(False, "add 2-D sine-cosine position embeddings to densified maps")
    loss_on: str = _opt("masked", "loss on 'masked' patches or 'all'")
    init: str | None = _opt(None, "encoder weights to start from (.safetensors or .pth with the original model's keys)")
    drop_path: float = _opt(0.0, "stochastic depth rate of the backbone (timm drop_path_rate, torchvision "
                                 "stochastic_depth_prob); 0: off; the paper recipes use 0.05 (ResNet-50), "
                                 "0.2 (ConvNeXt-S)", ge=0.0, lt=1.0)
    # optimisation (paper section 4.1 and the reference code's defaults)
    epochs: int = _opt(1600, "epochs", ge=1)
    warmup_epochs: float = _opt(40, "linear warm-up epochs", ge=0.0)
    batch_size: int = _opt(32, "images per step per device", ge=1)
    accum_steps: int = _opt(1, "gradient accumulation steps (effective batch = batch_size x accum_steps x devices)", ge=1)
    base_lr: float = _opt(2e-4, "lr = base_lr x effective batch / 256", gt=0.0)
    lr: float | None = _opt(None, "absolute peak lr (overrides base_lr)", gt=0.0)
    warmup_start_ratio: float = _opt(0.005, "lr at the start of warm-up, as a fraction of the peak", ge=0.0, le=1.0)
    final_lr_ratio: float = _opt(0.001, "lr at the end of the cosine, as a fraction of the peak", ge=0.0, le=1.0)
    weight_decay: float = _opt(0.04, "weight decay at the start of the cosine schedule", ge=0.0)
    weight_decay_end: float = _opt(0.2, "weight decay at the end", ge=0.0)
    betas: str = _opt("auto", "LAMB betas 'b1,b2'; auto: 0.9,0.95 for BatchNorm models, 0.9,0.999 for LayerNorm models")
    clip_grad: float = _opt(5.0, "clip the global gradient norm to this value, once per step (0: no clipping)", ge=0.0)
    # execution
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    precision: str = _opt("auto", "fp32, bf16, fp16, auto (bf16 on capable GPUs, else fp32), or fp64 (for checks)")
    channels_last: str = _opt("auto", "channels_last memory format for the model and images: auto (on for CUDA, off "
                                      "for CPU, where it slows convolution backward), true or false")
    compile: bool = _opt(False, "torch.compile the dense decoder (the sparse encoder runs eagerly)")
    seed: int = _opt(0, "random seed (data order, augmentation, masks)", ge=0)
    sync_bn: bool = _opt(True, "with several ranks: batch statistics over the visible sites of all ranks")
    dist_timeout: float = _opt(300.0, "seconds a collective may wait for another rank before the run fails", gt=0.0)
    # outputs
    out: str = _opt("runs/pretrain", "run directory: checkpoints, metrics, reconstructions, exported weights")
    save_every_epochs: int = _opt(1, "checkpoint every N epochs (0: only at the end of the run)", ge=0)
    save_every_steps: int = _opt(0, "also checkpoint every N optimiser steps (0: off)", ge=0)
    keep_last: int = _opt(3, "checkpoints kept", ge=1)
    log_every_steps: int = _opt(20, "metrics every N optimiser steps", ge=1)
    vis_every_epochs: int = _opt(10, "reconstruction grid every N epochs, and at start and end (0: only at start "
                                     "and end)", ge=0)
    tensorboard: bool = _opt(True, "write TensorBoard logs (needs the tensorboard package)")
    resume: str | None = _opt(None, "checkpoint to resume from, or 'auto' for the newest readable one in --out")
    overwrite: bool = _opt(False, "start afresh in an --out that holds another run, moving that run aside to "
                                  "OUT.old-<time> (without it such a folder is refused)")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        _check_bounds(self)
        need(self.in_chans in (1, 3, 4), f"in_chans must be 1, 3 or 4 for image files, got {self.in_chans}")
        need(self.norm_stats in ("imagenet", "data"), f"norm_stats must be 'imagenet' or 'data', got {self.norm_stats!r}")
        need(self.sparse_impl in ("fast", "reference"),
             f"sparse_impl must be 'fast' or 'reference', got {self.sparse_impl!r}")
        need(self.loss_on in ("masked", "all"), f"loss_on must be 'masked' or 'all', got {self.loss_on!r}")
        need(self.densify_norm in ("auto", "bn", "ln", "none"), f"densify_norm must be auto, bn, ln or none, got {self.densify_norm!r}")
        need(self.precision in ("auto", "fp32", "bf16", "fp16", "fp64"),
             f"precision must be auto, fp32, bf16, fp16 or fp64, got {self.precision!r}")
        self.channels_last = str(self.channels_last).lower()  # YAML and Python booleans too
        need(self.channels_last in ("auto", "true", "false"),
             f"channels_last must be auto, true or false, got {self.channels_last!r}")
        if self.betas != "auto":
            try:
                b = tuple(float(v) for v in self.betas.split(","))
            except ValueError:
                b = ()
            need(len(b) == 2 and all(0 <= v < 1 for v in b), f"betas must be 'auto' or 'b1,b2' in [0, 1), got {self.betas!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # settings whose change makes a checkpoint incompatible
    ARCHITECTURE = ("model", "in_chans", "decoder_width", "densify_norm", "hierarchical", "pos_embed")


_BOUNDS = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
           "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}


def _check_bounds(config) -> None:
    """Every numeric option against the bounds in its field metadata (``gt``, ``ge``, ``lt``,
    ``le``); one message naming the option, its flag, the allowed range and the value."""
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None or isinstance(value, bool):
            continue
        limits = [(k, f.metadata[k]) for k in _BOUNDS if k in f.metadata]
        if not isinstance(value, (int, float)):
            if limits:
                raise ConfigError(f"{f.name} must be a number, got {value!r}")
            continue
        if not all(_BOUNDS[k][0](value, b) for k, b in limits):
            bounds = {k: f"{b:g}" for k, b in limits}
            low, high = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
            if low is not None and high is not None:
                allowed = f"in {'(' if 'gt' in bounds else '['}{low}, {high}{')' if 'lt' in bounds else ']'}"
            else:
                allowed = " ".join(f"{_BOUNDS[k][1]} {b:g}" for k, b in limits)
            raise ConfigError(f"{f.name} must be {allowed}, got {value}")


def _types(cls=None) -> dict[str, type]:
    cls = cls or PretrainConfig
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args else t
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PretrainConfig:
    """Defaults, then a YAML file, then ``overrides`` (e.g. from the command line)."""
    values: dict = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {', '.join(difflib.get_close_matches(u, known, 2)) or '?'})" for u in unknown]
        raise ConfigError(f"unknown config options: {'; '.join(hints)}")
    types = _types()
    for k, v in list(values.items()):
        t = types[k]
        if t is float and isinstance(v, int):
            values[k] = float(v)
        elif t is not bool and t in (int, float, str) and not isinstance(v, t) and v is not None:
            try:
                values[k] = t(v)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"option {k} expects {t.__name__}, got {v!r}") from e
    return PretrainConfig(**values)


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls=None, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of the config dataclass ``cls`` (default :class:`PretrainConfig`,
    which also takes ``--config`` YAML files; defaults shown, they apply unless a YAML file sets them)."""
    if cls is None:
        cls = PretrainConfig
        parser.add_argument("--config", help="YAML file with options (command-line flags override it)")
    types = _types(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        t = types[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = f"{f.metadata['help']} (default: {default})"
        if t is bool:
            parser.add_argument(flag, type=_bool, metavar="{true,false}", default=None, help=help_)
        else:
            parser.add_argument(flag, type=t, default=None, help=help_)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name, None) is not None}
    return load_config(getattr(args, "config", None), overrides)
