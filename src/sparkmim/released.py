"""The paper's released checkpoints, read into sparkmim's model.

The reference code writes two files per pre-trained model (ImageNet-1k, 224 px; ResNet-50, 101,
152, 200 and ConvNeXt-S, B, L):

* ``<model>_withdecoder_1kpretrained_spark_style.pth``: ``module`` (the whole SparK model's state
  dict and a ``config`` entry), ``optimizer`` (its LAMB state), ``epoch``, ``arch``,
  ``input_size`` and a few strings;
* ``<model>_1kpretrained_timm_style.pth``: the encoder alone.

Keys map one to one onto sparkmim's model (:func:`reference_key`): the backbone
``sparse_encoder.sp_cnn.*`` -> ``encoder.model.*`` (the reference ConvNeXt has the
facebookresearch layout, renamed to timm's: :func:`convnext_key`), ``densify_norms.i`` /
``densify_projs.i`` / ``mask_tokens.i`` -> ``densify.i.norm`` / ``.proj`` / ``.mask_token``,
``dense_decoder.dec.i.up_sample`` / ``.conv`` -> ``decoder.blocks.i.up`` / ``.conv`` and
``dense_decoder.proj`` -> ``decoder.head``. The three constant buffers ``imn_m``, ``imn_s``
(ImageNet's mean and std) and ``norm_black`` are not weights and are left out. Files are read as
plain data only (:func:`~sparkmim.weights.load_plain`).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError
from .weights import ENCODER_PREFIX, KeyMismatchError, load_plain

__all__ = ["REFERENCE_BUFFERS", "is_spark_style", "is_reference_convnext", "convnext_key", "reference_key",
           "reference_encoder", "map_reference", "check_reference_config", "load_reference", "read_reference",
           "optimizer_names", "reference_moments", "continue_reference"]

REFERENCE_BUFFERS = ("imn_m", "imn_s", "norm_black")  # constants of the reference model, not weights
_ENCODER = "sparse_encoder.sp_cnn."
# the reference ConvNeXt (facebookresearch layout) -> timm's ConvNeXt
_CONVNEXT = [
    (r"^downsample_layers\.0\.([01])\.", r"stem.\1."),
    (r"^downsample_layers\.([123])\.([01])\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", "head.norm."),  # the final norm of the fine-tuning model (after pooling, as timm's)
    (r"^head\.", "head.fc."),  # its classifier
]
# the rest of the reference SparK model -> sparkmim's (``{i}``: a level or block number; a name
# ending without a dot is a whole key)
_PARTS = {"densify_norms.{i}.": "densify.{i}.norm.", "densify_projs.{i}.": "densify.{i}.proj.",
          "mask_tokens.{i}": "densify.{i}.mask_token", "dense_decoder.dec.{i}.up_sample.": "decoder.blocks.{i}.up.",
          "dense_decoder.dec.{i}.conv.": "decoder.blocks.{i}.conv.", "dense_decoder.proj.": "decoder.head."}
_MODEL = [("^" + re.escape(theirs).replace(re.escape("{i}"), r"(\d+)") + ("" if theirs.endswith(".") else "$"),
           ours.replace("{i}", r"\1")) for theirs, ours in _PARTS.items()]
# keys of sparkmim's model that no released file has: timm's ConvNeXt ends in a norm SparK never
# uses (the reference ConvNeXt has none); they keep their initialisation
_NOT_IN_FILES = re.compile(r"^encoder\.model\.head\.norm\.(weight|bias)$")


def is_spark_style(state) -> bool:
    """Whether ``state`` is a reference ``_withdecoder_..._spark_style.pth`` checkpoint."""
    module = state.get("module") if isinstance(state, dict) else None
    return isinstance(module, dict) and any(isinstance(k, str) and k.startswith(_ENCODER) for k in module)


def is_reference_convnext(state: dict) -> bool:
    """Whether an encoder state dict has the facebookresearch ConvNeXt layout (the reference code's)."""
    return any(k.startswith("downsample_layers.") for k in state)


def convnext_key(key: str) -> str:
    """A key of the reference (facebookresearch) ConvNeXt as timm's ConvNeXt names it; other
    keys unchanged."""
    for pattern, to in _CONVNEXT:
        new, n = re.subn(pattern, to, key)
        if n:
            return new
    return key


def reference_key(key: str, convnext: bool) -> str | None:
    """The key of sparkmim's model for a key of a reference SparK state dict (None: a constant
    buffer, left out)."""
    if key in REFERENCE_BUFFERS:
        return None
    if key.startswith(_ENCODER):
        inner = key[len(_ENCODER):]
        return ENCODER_PREFIX + (convnext_key(inner) if convnext else inner)
    for pattern, to in _MODEL:
        new, n = re.subn(pattern, to, key)
        if n:
            return new
    return key  # unknown: reported as left over


def reference_encoder(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights with timm's keys, from an encoder-only reference file (``_timm_style``;
    ConvNeXt keys renamed) or the ``module`` of a spark-style one."""
    if any(k.startswith(_ENCODER) for k in state):
        state = {k[len(_ENCODER):]: v for k, v in state.items() if k.startswith(_ENCODER)}
    if is_reference_convnext(state):  # the classifier of a fine-tuning file is no part of the backbone
        state = {convnext_key(k): v for k, v in state.items() if not convnext_key(k).startswith("head.fc.")}
        last = state.get("stages.3.blocks.0.norm.weight")
        if last is not None:  # timm's final norm, which the reference ConvNeXt lacks: at its initialisation
            state.setdefault("head.norm.weight", torch.ones_like(last))
            state.setdefault("head.norm.bias", torch.zeros_like(last))
    return state


def map_reference(module: dict, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """``module`` (a reference SparK state dict) as a state dict of ``model`` (sparkmim's SparK),
    and a report: ``loaded`` keys, ``left_out`` (the constant buffers), ``kept`` (model keys no
    released file has). Raises :class:`~sparkmim.weights.KeyMismatchError` in one line naming
    the first key left over in the file, missing from it, or of another shape."""
    tensors = {k: v for k, v in module.items() if k != "config"}
    convnext = is_reference_convnext({k[len(_ENCODER):]: v for k, v in tensors.items() if k.startswith(_ENCODER)})
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    left_out = []
    for key, value in tensors.items():
        to = reference_key(key, convnext)
        if to is None:
            left_out.append(key)
            continue
        if to not in own:
            raise KeyMismatchError(f"the reference checkpoint's {key} has no place in this model (as {to}): is it a "
                                   f"checkpoint of another architecture or decoder?")
        if tuple(own[to].shape) != tuple(value.shape):
            raise KeyMismatchError(f"the reference checkpoint's {key} is {tuple(value.shape)}, this model's {to} is "
                                   f"{tuple(own[to].shape)}")
        mapped[to] = value
    missing = [k for k in own if k not in mapped and not _NOT_IN_FILES.match(k)]
    if missing:
        raise KeyMismatchError(f"the reference checkpoint lacks {len(missing)} of this model's tensors, first "
                               f"{missing[0]}: is it a checkpoint of another architecture?")
    kept = [k for k in own if k not in mapped]
    return mapped, {"loaded": list(mapped), "left_out": left_out, "kept": kept}


def _model_settings(model) -> dict:
    return {"dense_decoder.width": model.decoder.widths[0], "densify_norm_str": model.densify_norm,
            "hierarchy": len(model.densify), "mask_ratio": model.mask_ratio}


_FLAGS = {"dense_decoder.width": "--decoder-width", "densify_norm_str": "--densify-norm", "hierarchy": "--hierarchical",
          "mask_ratio": "--mask-ratio", "sparse_encoder.input_size": "--input-size"}


def check_reference_config(config: dict, model, input_size: int | None = None) -> list[str]:
    """Compare a reference checkpoint's ``config`` with ``model`` (and the run's ``input_size``):
    a setting that changes shapes (decoder width, densify norm, number of decoded scales) raises
    :class:`~sparkmim.config.ConfigError` naming both values; one that does not (mask ratio,
    input size) is returned as a warning line."""
    ours = {**_model_settings(model), "sparse_encoder.input_size": input_size}
    for key in ("dense_decoder.width", "densify_norm_str", "hierarchy"):
        if key in config and config[key] != ours[key]:
            raise ConfigError(f"the reference checkpoint was trained with {key} {config[key]!r}, this model has "
                              f"{ours[key]!r} ({_FLAGS[key]}): they differ in shape")
    notes = []
    for key in ("mask_ratio", "sparse_encoder.input_size"):
        if key in config and ours[key] is not None and config[key] != ours[key]:
            notes.append(f"the reference checkpoint was trained with {key} {config[key]}, this run uses {ours[key]} "
                         f"({_FLAGS[key]}); continuing with the run's")
    return notes


def optimizer_names(arch: str) -> list[str]:
    """The reference code's parameter names in its LAMB optimiser's order (its saved state is keyed
    by this position), for the released architectures."""
    import gzip
    import json

    groups = json.loads(gzip.decompress((Path(__file__).parent / "released_optimizer_groups.json.gz").read_bytes()))
    if arch not in groups:
        raise ValueError(f"no optimiser layout is known for a reference checkpoint of {arch!r} (known: "
                         f"{', '.join(groups)}); --init FILE starts from its weights without it")
    return [name for group in groups[arch] for name in group]


def reference_moments(state: dict, model: nn.Module) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """The LAMB moments of a reference checkpoint (``exp_avg``, ``exp_avg_sq``) per parameter name
    of ``model``, and the optimiser's step count. ``ValueError`` in one line when the state does not
    fit the model."""
    optimizer = state.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        raise ValueError("the reference checkpoint holds no optimiser state: --init FILE starts from its weights")
    names = optimizer_names(str(state.get("arch")))
    ids = [i for group in optimizer.get("param_groups", []) for i in group["params"]]
    if len(ids) != len(names):
        raise ValueError(f"the reference checkpoint's optimiser has {len(ids)} parameters, a {state.get('arch')} "
                         f"SparK model {len(names)}")
    convnext = str(state.get("arch")).startswith("convnext")
    params = dict(model.named_parameters())
    moments = {}
    for position, name in zip(ids, names):
        ours = reference_key(name, convnext)
        kept = optimizer["state"].get(position)
        if kept is None:  # a parameter that never had a gradient has no moments
            continue
        m, v = kept["exp_avg"], kept["exp_avg_sq"]
        if ours not in params or tuple(params[ours].shape) != tuple(m.shape) or m.shape != v.shape:
            raise ValueError(f"the reference checkpoint's optimiser state of {name} does not fit this model's {ours}")
        moments[ours] = (m, v)
    steps = [int(group.get("step", 0)) for group in optimizer.get("param_groups", [])]
    return moments, max(steps, default=0)


def continue_reference(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                       input_size: int | None = None) -> dict:
    """Load a released run into ``model`` and ``optimizer`` to continue it: the whole SparK model
    (:func:`load_reference`), the LAMB moments of each parameter and the optimiser's step count
    (:func:`reference_moments`). What was loaded, for the resume event."""
    report = load_reference(model, state, input_size=input_size)
    moments, optimizer_steps = reference_moments(state, model)
    params = dict(model.named_parameters())
    for name, (m, v) in moments.items():
        p = params[name]
        optimizer.state[p] = {"exp_avg": m.to(p.device, p.dtype), "exp_avg_sq": v.to(p.device, p.dtype)}
    for group in optimizer.param_groups:
        group["step"] = float(optimizer_steps)
    return {"loaded_keys": len(report["loaded"]), "optimizer_moments": len(moments), "optimizer_steps": optimizer_steps}


def read_reference(path: str | Path) -> dict:
    """A reference spark-style checkpoint, read as plain data; ``ValueError`` when it is not one."""
    state = load_plain(path, "reference checkpoint")
    if not is_spark_style(state):
        raise ValueError(f"{path} is not a reference SparK checkpoint (a dict whose 'module' holds "
                         f"sparse_encoder.sp_cnn.* keys)")
    return state


def load_reference(model, path_or_state, input_size: int | None = None) -> dict[str, list[str]]:
    """Load a reference ``_withdecoder_..._spark_style.pth`` checkpoint (a path, or the dict read
    from it) into ``model``, a sparkmim :class:`~sparkmim.model.SparK` of the same architecture:
    encoder, densify norms and projections, mask tokens and decoder. The file's ``config`` is
    checked first (:func:`check_reference_config`; differences that keep shapes are warned
    about). Returns the :func:`map_reference` report."""
    state = path_or_state if isinstance(path_or_state, dict) else read_reference(path_or_state)
    if not is_spark_style(state):
        raise ValueError("not a reference SparK checkpoint (its 'module' holds no sparse_encoder.sp_cnn.* keys)")
    for note in check_reference_config(state["module"].get("config", {}), model, input_size):
        warnings.warn(note, stacklevel=2)
    mapped, report = map_reference(state["module"], model)
    model.load_state_dict(mapped, strict=False)
    return report
