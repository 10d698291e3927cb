"""What a run is built from: precision, the model and the optimiser (the device: :mod:`sparkmim.devices`;
the data and the memory format: the run's :class:`~sparkmim.modality.Modality`)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable

import torch

from ..backbones import create_backbone, feature_modules_for
from ..config import ConfigError, PretrainConfig, chosen_options, given_options, replace_config
from ..devices import resolve_device
from ..encoder import SparseEncoder
from ..masking import shown_size
from ..modality import Modality
from ..model import SparK
from ..optim import default_betas, hold_on_device, lamb, param_groups
from ..released import load_reference
from ..sources import ReleasedRun, kind_of, read_source
from ..weights import KeyMismatchError, load_encoder_weights

__all__ = ["resolve_device", "resolve_precision", "autocast_for", "build_model", "build_optimizer", "crop_from_plans",
           "width_from_encoder"]


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return name


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context: bf16 / fp16 autocast, or nothing."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def crop_from_plans(cfg: PretrainConfig) -> tuple[PretrainConfig, dict | None]:
    """For ``--model nnunet:PLANS.json`` with no crop given by the user (neither ``input_size`` nor
    ``input_depth`` as a flag; a recipe's crop yields), the crop of the plans' patch size (``D, H,
    W``; in-plane sides that differ become one side of about the same area, a multiple of the
    encoder's stride), and what was taken; else ``cfg`` unchanged and None."""
    from ..nnunet import plans_patch_size, stage_strides

    if not cfg.model.startswith("nnunet:") or given_options(cfg) & {"input_size", "input_depth"}:
        return cfg, None
    spec = cfg.model.removeprefix("nnunet:")
    patch = plans_patch_size(spec)
    if patch is None:
        return cfg, None
    depth, height, width = patch
    step = math.lcm(*(math.prod(s[axis] for s in stage_strides(spec)) for axis in (1, 2)))
    side = height if height == width else max(step, round(math.sqrt(height * width) / step) * step)
    taken = {"plans_patch_size": list(patch), "input_depth": depth, "input_size": side}
    return replace_config(cfg, input_depth=depth, input_size=side), taken


def width_from_encoder(cfg: PretrainConfig, modality: Modality) -> bool:
    """Whether a new run's decoder takes the encoder's deepest width (:class:`~sparkmim.model.SparK`
    with ``decoder_width=None``): for volumes, unless a recipe or the user set the width; the
    paper's 768, set for 2-D ResNets and ConvNeXts, makes a decoder of hundreds of millions of
    parameters on 3-D maps."""
    return modality.deepest_decoder_width and "decoder_width" not in chosen_options(cfg)


def build_model(cfg: PretrainConfig, modality: Modality, width_from_encoder: bool = False) -> SparK:
    """The backbone by name (random init), optional strict ``--init`` weights, wrapped in SparK;
    the crop of ``modality`` is checked against the encoder's total stride. ``width_from_encoder``:
    the decoder's width is the encoder's deepest (:func:`width_from_encoder`), not the config's."""
    if cfg.init == "pretrained":  # the backbone's own published weights; the decoder starts fresh
        try:
            with _quiet_hub():
                backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=cfg.drop_path, pretrained=True)
        except OSError as e:  # no network, a hub that does not answer, a file missing from the cache
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            raise ConfigError(f"could not fetch the published weights of {cfg.model} ({type(e).__name__}: {reason}); "
                              f"without a network, fetch them where there is one and pass the file with --init FILE "
                              f"(.safetensors or .pth of the backbone's weights), or a timm model folder with --model "
                              f"local-dir:FOLDER --init pretrained") from e
        print(json.dumps({"event": "init", "weights": "pretrained", "kind": "the backbone's own published weights "
                          "(timm's or torchvision's loader)", "model": cfg.model}), flush=True)
    else:
        backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=cfg.drop_path)
    modality.check_network(backbone, cfg.model)
    init = read_source(cfg.init) if cfg.init and cfg.init != "pretrained" else None
    whole = isinstance(init, ReleasedRun)  # a reference SparK model: loaded once SparK is built
    if whole and init.architecture and init.architecture != cfg.model.removeprefix("timm:"):
        raise ConfigError(f"--init {cfg.init} is a SparK checkpoint of {init.architecture}, the run's backbone is "
                          f"{cfg.model}: use --model {init.architecture}", ["init", "model"])
    if init is not None and not whole:
        report = _load_init(backbone, init, cfg)
        print(json.dumps({"event": "init", "weights": cfg.init, "kind": kind_of(init),
                          "matched_keys": len(report["matched"])}), flush=True)
    modules = [m.strip() for m in cfg.feature_modules.split(",") if m.strip()] if cfg.feature_modules else None
    encoder = SparseEncoder(backbone, modules or feature_modules_for(cfg.model), in_chans=cfg.in_chans,
                            sparse_impl=cfg.sparse_impl)
    _check_input_fits(cfg, modality, encoder.patch_size)
    model = SparK(encoder, mask_ratio=cfg.mask_ratio, decoder_width=None if width_from_encoder else cfg.decoder_width,
                  densify_norm=cfg.densify_norm, hierarchical=cfg.hierarchical, sparse=cfg.sparse, pos_embed=cfg.pos_embed, loss_on=cfg.loss_on,
                  norm_pix=cfg.norm_pix)
    if whole:
        report = load_reference(model, init.state, input_size=cfg.input_size)
        print(json.dumps({"event": "init", "weights": cfg.init, "arch": init.architecture,
                          "kind": "reference SparK model (encoder, densify, mask tokens, decoder)",
                          "loaded_keys": len(report["loaded"]), "left_out": report["left_out"],
                          "kept_at_init": report["kept"]}), flush=True)
    return model


@contextlib.contextmanager
def _quiet_hub():
    """The model hub's own retry lines silenced while a download is tried (a failure is reported
    once, in sparkmim's words)."""
    try:
        from huggingface_hub.utils import logging as hub_logging  # configures its logger when first imported
    except ImportError:
        yield
        return
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(hub_logging.ERROR)
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _load_init(backbone, init, cfg: PretrainConfig) -> dict:
    """The backbone weights of ``--init``'s source loaded strictly into ``backbone``; weights of
    another architecture are refused saying first, where the file tells, which architecture they
    are, then the keys."""
    try:
        return load_encoder_weights(backbone, init.backbone_weights(), strict=True)
    except KeyMismatchError as e:
        arch = init.architecture
        if arch is not None and arch != cfg.model:
            first = (f"--init {cfg.init} holds {arch} weights and the model is {cfg.model}: use --model {arch}, or "
                     f"weights of {cfg.model}")
        else:
            first = f"--init {cfg.init} does not fit {cfg.model} (the file does not say which architecture it holds)"
        raise KeyMismatchError(f"{first}; {e}") from e


def _check_input_fits(cfg, modality: Modality, patch: tuple[int, ...]) -> None:
    """Refuse a crop (``input_size``, and ``input_depth`` for volumes) that is not a multiple of the
    encoder's total stride along each axis, suggesting the nearest sizes that are."""
    shape = modality.input_shape(cfg)
    if not any(s % p for s, p in zip(shape, patch)):
        return
    steps: dict[str, int] = {}
    given: dict[str, int] = {}
    for name, size, step in zip(modality.crop_options(), shape, patch):
        steps[name], given[name] = math.lcm(steps.get(name, 1), step), size  # height and width share input_size
    fit = " and ".join(f"{k} {max(2, round(given[k] / step)) * step}" for k, step in steps.items())
    stride = shown_size(patch)
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
