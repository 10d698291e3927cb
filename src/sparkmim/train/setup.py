"""Everything a run is built from: device, precision and memory format, the model, the optimiser,
the data set."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..backbones import create_backbone, feature_modules_for, spatial_dims_for
from ..config import ConfigError, PretrainConfig
from ..data import (
    DataError,
    ImageFiles,
    compute_stats,
    default_stats,
    demo_photo_paths,
    list_images,
    pretrain_transform,
)
from ..encoder import SparseEncoder
from ..masking import per_axis
from ..model import SparK
from ..optim import default_betas, hold_on_device, lamb, param_groups
from ..weights import load_encoder_weights

__all__ = ["resolve_device", "resolve_precision", "resolve_channels_last", "autocast_for", "build_model",
           "build_optimizer", "build_data", "input_shape"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return name


def resolve_channels_last(value: str, device: torch.device) -> bool:
    """A config's ``channels_last`` (``auto``, ``true`` or ``false``) for ``device``. ``auto``:
    channels-last on CUDA (tensor-core convolutions), contiguous on CPU (where a convolution's
    weight gradient is much slower channels-last)."""
    if value == "auto":
        return device.type == "cuda"
    if value not in ("true", "false"):
        raise ConfigError(f"channels_last must be auto, true or false, got {value!r}")
    return value == "true"


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context: bf16 / fp16 autocast, or nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def input_shape(cfg, spatial_dims: int) -> tuple[int, ...]:
    """The input of a config with ``input_size`` and ``input_depth`` (pre-training or evaluation):
    ``(H, W)``, or ``(D, H, W)`` for volumes and clips."""
    size = (cfg.input_size, cfg.input_size)
    return size if spatial_dims == 2 else (cfg.input_depth or cfg.input_size, *size)


def build_model(cfg: PretrainConfig) -> SparK:
    """The backbone by name (random init), optional strict ``--init`` weights, wrapped in SparK."""
    backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=cfg.drop_path)
    if cfg.init:
        report = load_encoder_weights(backbone, cfg.init, strict=True)
        print(json.dumps({"event": "init", "weights": cfg.init, "matched_keys": len(report["matched"])}), flush=True)
    modules = [m.strip() for m in cfg.feature_modules.split(",") if m.strip()] if cfg.feature_modules else None
    encoder = SparseEncoder(backbone, modules or feature_modules_for(cfg.model), in_chans=cfg.in_chans,
                            sparse_impl=cfg.sparse_impl)
    _check_input_fits(cfg, per_axis(encoder.patch_size, encoder.spatial_dims))
    return SparK(encoder, mask_ratio=cfg.mask_ratio, decoder_width=cfg.decoder_width, densify_norm=cfg.densify_norm,
                 hierarchical=cfg.hierarchical, sparse=cfg.sparse, pos_embed=cfg.pos_embed, loss_on=cfg.loss_on,
                 norm_pix=cfg.norm_pix)


def crop_options(spatial_dims: int) -> tuple[str, ...]:
    """The option that sets the crop along each spatial axis (depth for volumes, then height and
    width, which share ``input_size``)."""
    return ("input_depth",) * (spatial_dims - 2) + ("input_size",) * 2


def _check_input_fits(cfg, patch: tuple[int, ...]) -> None:
    """Refuse a crop (``input_size``, and ``input_depth`` for volumes) that is not a multiple of the
    encoder's total stride along each axis, suggesting the nearest sizes that are."""
    import math

    shape = input_shape(cfg, len(patch))
    if not any(s % p for s, p in zip(shape, patch)):
        return
    steps: dict[str, int] = {}
    given: dict[str, int] = {}
    for name, size, step in zip(crop_options(len(patch)), shape, patch):
        steps[name], given[name] = math.lcm(steps.get(name, 1), step), size  # height and width share input_size
    fit = " and ".join(f"{k} {max(2, round(given[k] / step)) * step}" for k, step in steps.items())
    stride = str(patch[0]) if len(set(patch)) == 1 else "x".join(map(str, patch))
    raise ConfigError(f"{' x '.join(f'{k} {v}' for k, v in given.items())} is not a multiple of {cfg.model}'s total "
                      f"stride {stride}; try {fit}", list(steps))


def build_optimizer(model: SparK, cfg: PretrainConfig, peak_lr: float) -> torch.optim.Optimizer:
    """LAMB over :func:`param_groups` with the config's betas (auto: by the backbone's norm layers,
    :func:`default_betas`) and initial weight decay; it does not clip. On an accelerator, lr and
    weight decay are held as device tensors, so a step reads no host value (and can be captured)."""
    if cfg.betas == "auto":
        betas = default_betas(model.encoder.model)
    else:
        betas = tuple(float(v) for v in cfg.betas.split(","))
    optimizer = lamb(param_groups(model), lr=peak_lr, betas=betas, weight_decay=cfg.weight_decay)
    if next(model.parameters()).device.type != "cpu":  # on the CPU a float is no host read
        hold_on_device(optimizer)
    return optimizer


def build_data(cfg: PretrainConfig) -> tuple[ImageFiles, tuple, tuple, dict[str, str]]:
    """The data set, its normalisation statistics, and the listed files that do not exist
    (``{path: reason}``; a file list may name files that are gone). Volumes for 3-D models
    (:func:`~sparkmim.backbones.spatial_dims_for`)."""
    if spatial_dims_for(cfg.model) == 3:
        return _build_volumes(cfg)
    missing: dict[str, str] = {}
    if cfg.data:
        paths = list_images(cfg.data)
        if Path(cfg.data).is_file():
            paths, missing = _drop_missing(paths, cfg)
    else:
        photos = demo_photo_paths()
        paths = [photos[i % len(photos)] for i in range(cfg.demo_length)]
    if cfg.norm_stats == "data":
        mean, std = compute_stats(paths, cfg.in_chans)
    else:
        mean, std = default_stats(cfg.in_chans)
    transform = pretrain_transform(cfg.input_size, mean, std, scale=(cfg.crop_scale_min, 1.0))
    fast = (cfg.input_size, cfg.crop_scale_min) if cfg.fast_decode else None
    return ImageFiles(paths, transform, cfg.in_chans, fast_decode=fast), mean, std, missing


def _build_volumes(cfg: PretrainConfig) -> tuple[ImageFiles, tuple, tuple, dict[str, str]]:
    """Volume samples (each volume of a 4-D series is one), the 3-D augmentation, and display
    statistics: volumes are normalised one by one (``--intensity``), so the statistics returned
    only map -2..2 standard deviations to the grey scale of the reconstruction images."""
    from ..volumes import (
        VolumeFiles,
        demo_volume_paths,
        is_volume_file,
        list_samples,
        list_volumes,
        volume_transform,
    )

    if cfg.norm_stats == "data":
        raise ConfigError("volumes are normalised one by one (--intensity zscore or window:LOW:HIGH); "
                          "--norm-stats data is for images")
    missing: dict[str, str] = {}
    if cfg.data:
        paths = list_volumes(cfg.data)
        if Path(cfg.data).is_file() and not is_volume_file(Path(cfg.data)):  # a list of files
            paths, missing = _drop_missing(paths, cfg)
        samples = list_samples(paths)
    else:
        demo = list_samples(demo_volume_paths())
        samples = [demo[i % len(demo)] for i in range(cfg.demo_length)]
    transform = volume_transform(input_shape(cfg, 3), cfg.intensity, scale=(cfg.crop_scale_min, 1.0))
    mean, std = (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans
    return VolumeFiles(samples, transform, cfg.in_chans), mean, std, missing


def _drop_missing(paths: list[Path], cfg: PretrainConfig) -> tuple[list[Path], dict[str, str]]:
    missing = {str(p): "FileNotFoundError: no such file" for p in paths if not p.is_file()}
    present = [p for p in paths if str(p) not in missing]
    if not present:
        raise DataError(f"none of the {len(missing)} files listed in {cfg.data} exist (first: {next(iter(missing))})")
    if len(missing) > cfg.max_bad_fraction * len(paths):
        raise DataError(f"{len(missing)} of the {len(paths)} files listed in {cfg.data} do not exist (more than "
                        f"--max-bad-fraction {cfg.max_bad_fraction:g}; first: {next(iter(missing))})")
    return present, missing
