"""nnU-Net's networks as backbones, and checkpoints that stock nnU-Net v2 loads.

``--model nnunet:SPEC`` names a network nnU-Net builds, with the keys nnU-Net's checkpoints
have. ``SPEC`` is a preset (``resenc_m``, ``resenc_l``, ``resenc_xl``, ``plain``) or a plans
file, ``PATH/nnUNetPlans.json`` with an optional ``:CONFIGURATION`` (default ``3d_fullres``):
the network that plans file makes nnU-Net build (its ``architecture``: ``network_class_name``
and ``arch_kwargs``; configurations inheriting from others and the plans layout of nnU-Net
before 2.4 are read too). SparK pre-trains the network's encoder (``encoder.*``); its decoder
takes no part in pre-training.

:func:`nnunet_checkpoint` writes what ``nnUNetv2_train ... -pretrained_weights FILE`` reads:
``{"network_weights": state}`` with every key of the plans' network, the encoder from the run
(its decoder holds the encoder again, under ``decoder.encoder.*``) and the decoder at nnU-Net's
own initialisation.

The networks come from nnU-Net's ``dynamic-network-architectures`` package, installed without
its ``timm<1.0.23`` pin so that timm stays current (see the README).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import pydoc
from pathlib import Path

import torch
from torch import nn

from .masking import per_axis

__all__ = ["PRESETS", "create_nnunet", "read_plans", "plans_patch_size", "stage_strides", "feature_modules", "nnunet_state",
           "nnunet_checkpoint", "NNUNET_INSTALL"]

NNUNET_INSTALL = "pip install --no-deps dynamic-network-architectures==0.4.4 einops"

# nnU-Net's 3d_fullres networks for an isotropic plan, as nnU-Net v2 builds them (its planners'
# defaults: 6 stages, strides 1, 2, 2, 2, 2, 2, widths from 32 doubling to at most 320, 3x3x3
# kernels, biased convolutions, affine instance norm (eps 1e-5), leaky ReLU). The residual-encoder
# presets M, L and XL share this network and differ in the GPU memory their planners target,
# hence in the crop (see the nnunet_resenc_l recipe); "plain" is the default planner's
# PlainConvUNet (two convolutions per stage).
_COMMON = dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], kernel_sizes=3,
               strides=[1, 2, 2, 2, 2, 2], conv_bias=True, norm_op_kwargs={"eps": 1e-5, "affine": True},
               nonlin_kwargs={"inplace": True}, deep_supervision=False)
_RESENC = ("ResidualEncoderUNet", {"n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 5})
PRESETS = {
    "resenc_m": _RESENC,
    "resenc_l": _RESENC,
    "resenc_xl": _RESENC,
    "plain": ("PlainConvUNet", {"n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5}),
}
_OPS = ("conv_op", "norm_op", "dropout_op", "nonlin")  # arguments a plans file names as dotted paths


def _unet_module():
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError as e:
        raise ValueError(f"nnU-Net's networks need the dynamic-network-architectures package, installed without "
                         f"its timm pin so that timm stays current: {NNUNET_INSTALL}") from e
    return unet


def _split(spec: str) -> tuple[str | None, Path | None, str]:
    """(preset, plans path, configuration) of ``resenc_l`` or ``PATH.json[:CONFIGURATION]``."""
    if spec in PRESETS:
        return spec, None, "3d_fullres"
    path, configuration = spec, "3d_fullres"
    if not spec.endswith(".json") and ".json:" in spec:
        path, configuration = spec.rsplit(":", 1)
    if not path.endswith(".json"):
        near = difflib.get_close_matches(spec, PRESETS, n=1)
        hint = f" (did you mean nnunet:{near[0]}?)" if near else ""
        raise ValueError(f"unknown nnU-Net network '{spec}'{hint}: give a preset ({', '.join(PRESETS)}) or a plans "
                         f"file, nnunet:PATH/nnUNetPlans.json[:CONFIGURATION]")
    return None, Path(path), configuration


def _old_layout(conf: dict) -> dict:
    """The ``architecture`` entry of a configuration written by nnU-Net before 2.4 (``UNet_class_name``,
    ``pool_op_kernel_sizes``, ...), as nnU-Net itself reconstructs it."""
    name = conf["UNet_class_name"]
    if name not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ValueError(f"plans of nnU-Net before 2.4 with network {name}: only PlainConvUNet and "
                         f"ResidualEncoderUNet can be rebuilt; re-plan with a current nnU-Net")
    n = len(conf["n_conv_per_stage_encoder"])
    dims = len(conf["patch_size"])
    blocks = "n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": [min(conf["UNet_base_num_features"] * 2**i, conf["unet_max_num_features"])
                                       for i in range(n)],
                "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
                "kernel_sizes": conf["conv_kernel_sizes"], "strides": conf["pool_op_kernel_sizes"],
                blocks: conf["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": conf["n_conv_per_stage_decoder"], "conv_bias": True,
                "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": list(_OPS)}


def read_plans(path: str | Path, configuration: str = "3d_fullres") -> dict:
    """The configuration ``configuration`` of an nnU-Net plans file, its ``inherits_from`` chain
    resolved, with an ``architecture`` entry (rebuilt for plans of nnU-Net before 2.4).
    ``ValueError`` names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nnU-Net plans file {path} does not exist")
    try:
        plans = json.loads(path.read_text())
        configurations = plans["configurations"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not an nnU-Net plans file (a JSON object with 'configurations'): {e}") from e
    seen: list[str] = []
    name = configuration
    chain = []
    while True:
        if name not in configurations:
            raise ValueError(f"{path} has no configuration '{name}' (it has {', '.join(configurations)})")
        if name in seen:
            raise ValueError(f"{path}: configurations inherit in a circle: {' -> '.join([*seen, name])}")
        seen.append(name)
        chain.append(configurations[name])
        name = configurations[name].get("inherits_from")
        if name is None:
            break
    conf: dict = {}
    for part in reversed(chain):  # the parent first, each child's entries over it
        conf.update(copy.deepcopy(part))
    if "architecture" not in conf:
        try:
            conf["architecture"] = _old_layout(conf)
        except KeyError as e:
            raise ValueError(f"{path} configuration '{configuration}' has no 'architecture' entry (nor the {e} "
                             f"entry of the layout before nnU-Net 2.4)") from e
    return conf


def _locate(dotted: str | None, within: tuple[str, ...], what: str):
    """The class a plans file names, looked up only inside ``within`` (a plans file is data: it
    cannot name arbitrary code)."""
    if dotted is None:
        return None
    if not isinstance(dotted, str) or not dotted.startswith(within):
        raise ValueError(f"the plans name {what} {dotted!r}; sparkmim builds only classes of "
                         f"{' or '.join(w.rstrip('.') for w in within)}")
    found = pydoc.locate(dotted)
    if found is None and dotted.startswith("dynamic_network_architectures."):  # moved between versions
        found = getattr(_unet_module(), dotted.rsplit(".", 1)[1], None)
    if not isinstance(found, type):
        raise ValueError(f"the plans name {what} {dotted!r}, which this installation does not have")
    return found


def _plans_network(path: Path, configuration: str) -> tuple[type, dict]:
    arch = read_plans(path, configuration)["architecture"]
    _unet_module()  # its classes are what the plans name: say how to install it before looking them up
    try:
        kwargs = dict(arch["arch_kwargs"])
        cls = _locate(arch["network_class_name"], ("dynamic_network_architectures.",), "the network")
    except KeyError as e:
        raise ValueError(f"{path} configuration '{configuration}': its architecture has no {e} entry") from e
    for op in arch.get("_kw_requires_import", _OPS):
        if op in kwargs:
            kwargs[op] = _locate(kwargs[op], ("torch.nn.",), op)
    return cls, kwargs


def _network(spec: str) -> tuple[type, dict]:
    """The class and constructor arguments (without channels and classes) of a preset or plans."""
    preset, path, configuration = _split(spec)
    if path is not None:
        return _plans_network(path, configuration)
    name, arch = PRESETS[preset]
    kwargs = {**_COMMON, **arch, "conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "nonlin": nn.LeakyReLU}
    return getattr(_unet_module(), name), kwargs


def create_nnunet(spec: str, in_chans: int = 1, num_classes: int = 2, initialize: bool = True,
                  **overrides) -> nn.Module:
    """nnU-Net's network of a preset or plans file (``spec`` as in the module notes): the whole
    U-Net, whose encoder SparK pre-trains, with nnU-Net's keys. ``initialize`` applies the
    network's own initialisation, as nnU-Net does (He-normal convolutions, zero biases, the last
    norm of each residual block zero). ``overrides`` change the architecture's arguments (e.g.
    ``features_per_stage`` for a small network in tests)."""
    cls, kwargs = _network(spec)
    kwargs.update(overrides, deep_supervision=False)
    try:
        network = cls(input_channels=in_chans, num_classes=num_classes, **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise ValueError(f"nnU-Net's {cls.__name__} cannot be built from nnunet:{spec}: {e}") from e
    if initialize and hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def plans_patch_size(spec: str) -> tuple[int, ...] | None:
    """The patch size a plans file's configuration trains with, along sparkmim's volume axes
    ``(D, H, W)`` (the plans list it in the order of their ``transpose_forward``); None for a
    preset, which has no plans, or plans without one."""
    _, path, configuration = _split(spec)
    if path is None:
        return None
    patch = read_plans(path, configuration).get("patch_size")
    if not isinstance(patch, list):
        return None
    order = json.loads(path.read_text()).get("transpose_forward", list(range(len(patch))))
    size = [0] * len(patch)
    for j, axis in enumerate(order):
        size[axis] = int(patch[j])
    return tuple(size)


def stage_strides(spec: str) -> list[tuple[int, ...]]:
    """The stride of each encoder stage of a preset or plans (one value per axis)."""
    _, kwargs = _network(spec)
    strides, n = kwargs["strides"], kwargs["n_stages"]
    return [per_axis(s, 3) for s in ([strides] * n if isinstance(strides, int) else strides)]


def feature_modules(spec: str) -> list[str]:
    """The encoder stages SparK decodes from: every stage after the first stride (a stage at the
    input's resolution has no decoder level), anisotropic strides included."""
    total, names = (1, 1, 1), []
    for i, s in enumerate(stage_strides(spec)):
        total = tuple(a * b for a, b in zip(total, s))
        if math.prod(total) > 1:
            names.append(f"encoder.stages.{i}")
    return names


def nnunet_state(encoder: dict[str, torch.Tensor], network: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of ``network`` (nnU-Net's, freshly initialised) with every ``encoder.*``
    tensor, and its copy under ``decoder.encoder.*``, taken from ``encoder`` (a pre-trained
    backbone's state dict, the same network's keys). Returns the state and a report: the keys
    from the run, those at nnU-Net's initialisation, and the segmentation heads (which nnU-Net
    does not load). ``ValueError`` when the run's encoder does not fit the network."""
    own = network.state_dict()
    needed = {k: k.removeprefix("decoder.") for k in own if k.removeprefix("decoder.").startswith("encoder.")}
    trained = {k for k in encoder if k.startswith("encoder.")}
    missing = sorted({v for v in needed.values()} - trained)
    extra = sorted(trained - set(needed.values()))
    if missing or extra:
        first = f"missing from the run: {missing[0]}" if missing else f"not in the plans' network: {extra[0]}"
        raise ValueError(f"the run's encoder does not fit this nnU-Net network ({len(missing)} keys missing, "
                         f"{len(extra)} extra; {first}): export with the plans the run's network came from")
    for key, src in needed.items():
        if tuple(own[key].shape) != tuple(encoder[src].shape):
            raise ValueError(f"the run's encoder does not fit this nnU-Net network: {src} is "
                             f"{tuple(encoder[src].shape)} in the run, {tuple(own[key].shape)} in the plans' network "
                             f"(other input channels, widths or kernels?)")
    state = {k: (encoder[needed[k]] if k in needed else v).detach().cpu().clone().contiguous() for k, v in own.items()}
    report = {"from_run": sorted(needed), "nnunet_init": sorted(k for k in own if k not in needed and ".seg_layers." not in k),
              "seg_layers": sorted(k for k in own if ".seg_layers." in k)}
    return state, report


def nnunet_checkpoint(encoder: dict[str, torch.Tensor], plans: str | Path, configuration: str, in_chans: int,
                      out: str | Path, num_classes: int = 2, source: dict | None = None) -> dict:
    """Write ``out``, a checkpoint ``nnUNetv2_train ... -pretrained_weights out`` loads: the
    network of ``plans`` / ``configuration`` for ``in_chans`` input channels with the run's encoder
    (:func:`nnunet_state`), under ``network_weights``; ``source`` (plain data) is kept beside it as
    ``sparkmim``. Returns the key report. The segmentation heads' class count does not matter:
    nnU-Net skips them."""
    from .weights import atomic_write, state_bytes

    network = create_nnunet(f"{plans}:{configuration}", in_chans, num_classes)
    state, report = nnunet_state(encoder, network)
    payload = {"network_weights": state, "sparkmim": dict(source or {}, plans=str(plans), configuration=configuration)}
    atomic_write(Path(out), lambda tmp: torch.save(payload, tmp), state_bytes(state))
    return report
