"""Typed pre-training configuration: defaults from the paper, YAML files, command-line overrides.

Each option is a field with its type, default, help and bounds; the values a string option takes
are its ``Literal`` type. Validation, conversion of YAML and flag values and the ``--help`` groups
all read these declarations, so an option is declared once. (This module imports no torch, so
``sparkmim --help`` and bad options answer at once.)"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Literal

__all__ = ["PretrainConfig", "load_config", "add_config_arguments", "config_from_args", "config_for_run", "ConfigError",
           "opt", "parse_bool", "recipe_path", "RESUMABLE", "given_options", "chosen_options", "replace_config", "DEMO_DATA", "RECIPES", "flag_of", "typed_options", "parse_intensity", "parse_spacing", "NormStats", "DensifyNorm", "SparseImpl", "LossOn", "Precision", "ChannelsLast"]

RECIPES = Path(__file__).parent / "configs"
DEMO_DATA = "demo"  # ``--data demo``: the built-in demo photographs (volumes for 3-D models)

# the values of the string options (the model's constructors validate against the same aliases)
NormStats = Literal["imagenet", "data"]
DensifyNorm = Literal["auto", "bn", "ln", "none"]
SparseImpl = Literal["fast", "reference"]
LossOn = Literal["masked", "all"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "fp64"]
ChannelsLast = Literal["auto", "true", "false"]


class ConfigError(ValueError):
    """An invalid configuration value, with a message that says what to do.

    ``options`` are the option names the message mentions (as the Python API spells them,
    ``batch_size``); :meth:`for_flags` gives the message as the command line spells them
    (``--batch-size``)."""

    def __init__(self, message: str, options: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.options = tuple(options)

    def for_flags(self, typed: set[str] | None = None) -> str:
        """The message with each option named as its flag; with ``typed``, only the options the
        user gave as flags (one set in a YAML recipe keeps its key, as the file spells it)."""
        import re

        message = str(self)
        for name in self.options:
            if typed is None or name in typed:
                message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag_of(name), message)
        return message


def flag_of(name: str) -> str:
    """The command-line flag of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def opt(default, help: str, *, group: str | None = None, **bounds):
    """A config field: its default, its help text, its ``--help`` group, and numeric bounds
    (``gt``, ``ge``, ``lt``, ``le``) checked by :func:`validate`."""
    return field(default=default, metadata={"help": help, "group": group, **bounds})


_data, _model, _optim, _run, _out = (partial(opt, group=g) for g in
                                     ("data", "model", "optimisation", "execution", "outputs"))


@dataclass
class PretrainConfig:
    data: str | None = _data(None, "image folder (searched recursively) or a text file listing image paths "
                                  "(volumes: .nii, .nii.gz, .npy, .tif stacks, or an nnU-Net raw dataset "
                                  "folder, for 3-D models), or 'demo': the built-in demo photographs (volumes "
                                  "for 3-D models; a folder named demo is ./demo); required unless resuming")
    input_size: int = _data(224, "crop size in pixels (a multiple of the encoder's total stride); with "
                                 "--model nnunet:PLANS.json and neither --input-size nor --input-depth given, the "
                                 "plans' patch size", gt=0)
    input_depth: int = _data(0, "volumes and clips (3-D models): crop depth in slices or frames (a multiple of the "
                                "encoder's stride along depth); 0: input_size", ge=0)
    intensity: str = _data("zscore", "volumes: 'zscore' (per volume and channel; MRI, microscopy) or "
                                     "'window:LOW:HIGH' (CT: clip to the window, e.g. window:-1000:400 in HU, "
                                     "and map it to [-1, 1])")
    in_chans: int = _data(3, "input channels: images 3 (RGB), 1 (grayscale) or 4 (RGBA); volumes any number (an "
                             "nnU-Net dataset: its dataset.json's channels)", ge=1)
    spacing: str | None = _data(None, "volumes: resample each NIfTI volume to this voxel size, 'X,Y,Z' in the "
                                      "header's units (mm) along the file's axes i, j, k, before cropping (thick "
                                      "slices too); empty: keep each file's voxel grid")
    foreground_crop: bool = _data(False, "volumes: crop each volume to the box of its non-zero voxels (in any "
                                         "channel) before sampling crops, as nnU-Net does")
    norm_stats: NormStats = _data("imagenet", "normalisation: 'imagenet', or 'data' to compute mean/std from the images")
    crop_scale_min: float = _data(0.67, "RandomResizedCrop minimum area fraction (volumes: fraction of each "
                                        "axis)", gt=0.0, le=1.0)
    max_bad_fraction: float = _data(0.5, "stop when more than this fraction of the distinct image files read so far "
                                        "are unreadable", ge=0.0, le=1.0)
    demo_length: int = _data(512, "images per epoch when using the demo photographs", ge=1)
    workers: int = _data(2, "data-loading worker processes", ge=0)
    fast_decode: bool = _data(True, "JPEGs: decode at 1/2-1/8 scale when even the smallest crop stays larger than "
                                   "input_size (draft mode), else with torchvision's decoder")
    model: str = _model("resnet50", "backbone: timm name, 'timm:NAME', 'torchvision:NAME' (image or video "
                                    "models, e.g. torchvision:r3d_18), 'monai:NAME' (volumes: resnet10, "
                                    "resnet18, resnet34, resnet50, densenet121, segresnet, dynunet) or "
                                    "'nnunet:PRESET' / 'nnunet:PLANS.json[:CONFIGURATION]' (volumes: nnU-Net's "
                                    "resenc_m, resenc_l, resenc_xl, plain, or the network of a plans file)")
    feature_modules: str | None = _model(None, "comma-separated modules whose outputs are decoded, e.g. "
                                               "layer1,layer2,layer3 (patch = the last one's stride: fewer stages "
                                               "give a finer mask grid); empty: found automatically")
    mask_ratio: float = _model(0.6, "fraction of patches masked", gt=0.0, lt=1.0)
    decoder_width: int = _model(768, "decoder width (halved per upsampling block); for volumes, unless a recipe or "
                                     "this flag sets it, the encoder's deepest width (rounded up so that it halves "
                                     "evenly)", ge=1)
    densify_norm: DensifyNorm = _model("auto", "densify norm: auto, bn, ln or none")
    hierarchical: bool = _model(True, "decode from all scales (False: coarsest only)")
    sparse: bool = _model(True, "sparse encoder (False: zero-out masking ablation)")
    sparse_impl: SparseImpl = _model("fast", "sparse encoder implementation: 'fast' (visible sites only) or 'reference' "
                                    "(dense then mask); same results")
    pos_embed: bool = _model(False, "add 2-D sine-cosine position embeddings to densified maps")
    loss_on: LossOn = _model("masked", "loss on 'masked' patches or 'all'")
    norm_pix: bool = _model(True, "target: each patch's pixels normalised by the patch's mean and std (the paper); "
                                  "false: the normalised image's pixels")
    init: str | None = _model(None, "weights to start from: a file of the backbone's weights (.safetensors or "
                                    ".pth with the original model's keys, the paper's _timm_style files), another "
                                    "run's folder or checkpoint (its encoder), one of the "
                                    "paper's _withdecoder_..._spark_style.pth files (the whole model), or "
                                    "'pretrained' (the backbone's own published weights, downloaded by timm or "
                                    "torchvision)")
    drop_path: float = _model(0.0, "stochastic depth rate of the backbone (timm drop_path_rate, torchvision "
                                 "stochastic_depth_prob); 0: off; the paper recipes use 0.05 (ResNet-50), "
                                 "0.2 (ConvNeXt-S)", ge=0.0, lt=1.0)
    epochs: int = _optim(1600, "epochs", ge=1)
    warmup_epochs: float = _optim(40, "linear warm-up epochs", ge=0.0)
    batch_size: int = _optim(32, "images per step per device", ge=1)
    accum_steps: int = _optim(1, "gradient accumulation steps (effective batch = batch_size x accum_steps x devices)", ge=1)
    base_lr: float = _optim(2e-4, "lr = base_lr x effective batch / 256", gt=0.0)
    lr: float | None = _optim(None, "absolute peak lr (overrides base_lr)", gt=0.0)
    warmup_start_ratio: float = _optim(0.005, "lr at the start of warm-up, as a fraction of the peak", ge=0.0, le=1.0)
    final_lr_ratio: float = _optim(0.001, "lr at the end of the cosine, as a fraction of the peak", ge=0.0, le=1.0)
    weight_decay: float = _optim(0.04, "weight decay at the start of the cosine schedule", ge=0.0)
    weight_decay_end: float = _optim(0.2, "weight decay at the end", ge=0.0)
    betas: str = _optim("auto", "LAMB betas 'b1,b2'; auto: 0.9,0.95 for BatchNorm models, 0.9,0.999 for LayerNorm models")
    clip_grad: float = _optim(5.0, "clip the global gradient norm to this value, once per step (0: no clipping)", ge=0.0)
    device: str = _run("auto", "cpu, cuda, cuda:N or auto")
    precision: Precision = _run("auto", "fp32, bf16, fp16, auto (bf16 on capable GPUs, else fp32), or fp64 (for checks); "
                                      "CPUs without bf16/fp16 arithmetic run bf16 and fp16 about 15x slower than fp32")
    channels_last: ChannelsLast = _run("auto", "channels-last memory format for the model and inputs: auto (on for CUDA "
                                      "with images; off on CPU, where it slows convolution backward, and for volumes, "
                                      "where it is not measured), true (channels_last; channels_last_3d for volumes) or "
                                      "false; every feature map, densified map and decoder map follows the inputs' layout")
    compile: bool = _run(False, "torch.compile the dense decoder (the sparse encoder runs eagerly)")
    capture: bool = _run(False, "CUDA: record the whole training step (forward, backward, clip, LAMB) once as a CUDA "
                                "graph after 3 eager steps and replay it (one launch per step); one GPU, bf16 or "
                                "fp32")
    benchmark: int = _run(0, "run this many steps on your data and device and print img/s, the share of time "
                             "spent waiting for data and the estimated time of the whole run; writes nothing (no run "
                             "folder); 0: off", ge=0)
    seed: int = _run(0, "random seed (data order, augmentation, masks)", ge=0)
    sync_bn: bool = _run(True, "with several ranks: batch statistics over the visible sites of all ranks")
    dist_timeout: float = _run(300.0, "seconds a collective may wait for another rank before the run fails", gt=0.0)
    out: str = _out("runs/pretrain", "run directory: checkpoints, metrics, reconstructions, exported weights")
    save_every_epochs: int = _out(1, "checkpoint every N epochs (0: only at the end of the run)", ge=0)
    save_every_steps: int = _out(0, "also checkpoint every N optimiser steps (0: off)", ge=0)
    keep_last: int = _out(3, "checkpoints kept", ge=1)
    log_every_steps: int = _out(20, "metrics every N optimiser steps", ge=1)
    vis_every_epochs: int = _out(10, "reconstruction grid every N epochs, and at start and end (0: only at start "
                                     "and end)", ge=0)
    tensorboard: bool = _out(True, "write TensorBoard logs (needs the tensorboard package)")
    resume: str | None = _out(None, "checkpoint to resume from (a run folder: its newest readable one; one of "
                                    "the paper's _spark_style.pth files continues that run), or 'auto' for the "
                                    "newest readable one in --out")
    overwrite: bool = _out(False, "start afresh in an --out that holds another run, moving that run aside to "
                                  "OUT.old-<time> (without it such a folder is refused)")
    progress: bool = _out(True, "show a progress bar")

    def __post_init__(self):
        self.channels_last = str(self.channels_last).lower()  # YAML and Python booleans too
        validate(self)
        parse_intensity(self.intensity)
        parse_spacing(self.spacing)
        if self.betas != "auto":
            try:
                b = tuple(float(v) for v in self.betas.split(","))
            except ValueError:
                b = ()
            if len(b) != 2 or not all(0 <= v < 1 for v in b):
                raise ConfigError(f"betas must be 'auto' or 'b1,b2' in [0, 1), got {self.betas!r}", ["betas"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # settings whose change makes a checkpoint incompatible
    ARCHITECTURE = ("model", "in_chans", "feature_modules", "decoder_width", "densify_norm", "hierarchical", "pos_embed")


def parse_spacing(spec: str | None) -> tuple[float, float, float] | None:
    """A ``--spacing`` option, ``X,Y,Z`` voxel sizes along a NIfTI file's axes ``i, j, k``, as
    sizes along sparkmim's volume axes ``(D, H, W)`` = ``(Z, Y, X)``; None for no option."""
    if spec is None or str(spec).strip() == "":
        return None
    try:
        x, y, z = (float(v) for v in str(spec).split(","))
    except ValueError:
        x = y = z = -1.0
    if not all(v > 0 and math.isfinite(v) for v in (x, y, z)):
        raise ConfigError(f"spacing must be three positive voxel sizes 'X,Y,Z' (e.g. 1,1,1 or 0.8,0.8,3), "
                          f"got {spec!r}", ["spacing"])
    return z, y, x


def parse_intensity(spec: str) -> tuple[str, tuple[float, float] | None]:
    """A volume intensity option, ``zscore`` or ``window:LOW:HIGH`` (e.g. ``window:-1000:400``),
    as ``(kind, window)``; raises :class:`ConfigError` for anything else."""
    if spec == "zscore":
        return "zscore", None
    if isinstance(spec, str) and spec.startswith("window:"):
        try:
            low, high = (float(v) for v in spec.removeprefix("window:").split(":"))
        except ValueError:
            low = high = None
        if low is not None and high > low:
            return "window", (low, high)
    raise ConfigError(f"intensity must be 'zscore' or 'window:LOW:HIGH' with LOW < HIGH, got {spec!r}", ["intensity"])


_BOUNDS = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
           "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}


def validate(config) -> None:
    """Every option of a config dataclass against its declaration: a ``Literal`` type's values,
    and the numeric bounds in its field metadata (``gt``, ``ge``, ``lt``, ``le``); one message
    naming the option, what it takes and the value."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        choices = _choices(hints[f.name])
        if choices and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}", [f.name])
        if value is None or isinstance(value, bool):
            continue
        limits = [(k, f.metadata[k]) for k in _BOUNDS if k in f.metadata]
        if not isinstance(value, (int, float)):
            if limits:
                raise ConfigError(f"{f.name} must be a number, got {value!r}", [f.name])
            continue
        if not all(_BOUNDS[k][0](value, b) for k, b in limits):
            bounds = {k: f"{b:g}" for k, b in limits}
            low, high = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
            if low is not None and high is not None:
                allowed = f"in {'(' if 'gt' in bounds else '['}{low}, {high}{')' if 'lt' in bounds else ']'}"
            else:
                allowed = " ".join(f"{_BOUNDS[k][1]} {b:g}" for k, b in limits)
            raise ConfigError(f"{f.name} must be {allowed}, got {value}", [f.name])


def _choices(hint) -> tuple:
    """The values of a ``Literal`` type (also inside ``X | None``); empty for other types."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return next((_choices(a) for a in typing.get_args(hint) if _choices(a)), ())


def _types(cls=None) -> dict[str, type]:
    """The plain type of each field (``int`` for ``int | None``, ``str`` for a string ``Literal``)."""
    cls = cls or PretrainConfig
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        t = hints[f.name]
        choices = _choices(t)
        if choices:
            out[f.name] = type(choices[0])
            continue
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args else t
    return out


def recipe_path(name_or_path: str | None) -> str | None:
    """A YAML path, or the name of a built-in recipe (``sparkmim/configs/NAME.yaml``)."""
    if name_or_path is None or Path(name_or_path).is_file():
        return name_or_path
    builtin = RECIPES / f"{name_or_path}.yaml"
    if builtin.is_file():
        return str(builtin)
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path} is neither a file nor a built-in recipe ({names})")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PretrainConfig:
    """Defaults, then a YAML file, then ``overrides`` (e.g. from the command line). The options the
    overrides set are remembered (:func:`given_options`)."""
    values = _read_yaml(path) if path is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return _build({**values, **given}, given, {**values, **given})


def _read_yaml(path: str | Path) -> dict:
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
    return loaded


def _typed(values: dict) -> dict:
    """``values`` with unknown options refused (naming the closest known ones) and each value
    converted to its option's type."""
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {', '.join(difflib.get_close_matches(u, known, 2)) or '?'})" for u in unknown]
        raise ConfigError(f"unknown config options: {'; '.join(hints)}")
    types = _types()
    values = dict(values)
    for k, v in list(values.items()):
        t = types[k]
        if t is float and isinstance(v, int):
            values[k] = float(v)
        elif t is not bool and t in (int, float, str) and not isinstance(v, t) and v is not None:
            try:
                values[k] = t(v)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"option {k} expects {t.__name__}, got {v!r}", [k]) from e
    return values


def _build(values: dict, given, chosen=None) -> PretrainConfig:
    cfg = PretrainConfig(**_typed(values))
    cfg._given = frozenset(given)
    cfg._chosen = frozenset(given if chosen is None else chosen)
    return cfg


def given_options(cfg: PretrainConfig) -> frozenset[str]:
    """The options the user chose: given as flags or keyword arguments, or kept from the run a
    resume continues; a recipe's values are defaults (for a config built directly: the options
    that differ from their defaults)."""
    given = getattr(cfg, "_given", None)
    if given is not None:
        return given
    return frozenset(f.name for f in fields(cfg) if getattr(cfg, f.name) != f.default)


def chosen_options(cfg: PretrainConfig) -> frozenset[str]:
    """The options set by a recipe or by the user (:func:`given_options`), as opposed to
    sparkmim's defaults."""
    chosen = getattr(cfg, "_chosen", None)
    return given_options(cfg) if chosen is None else chosen | given_options(cfg)


def replace_config(cfg: PretrainConfig, **changes) -> PretrainConfig:
    """``cfg`` with ``changes`` (validated again), remembering which options were given."""
    new = dataclasses.replace(cfg, **changes)
    new._given = given_options(cfg) | frozenset(changes)
    new._chosen = chosen_options(cfg) | frozenset(changes)
    return new


# what a resumed run may change; every other setting is the run's own (its config.yaml)
RESUMABLE = ("epochs", "workers", "device", "precision", "channels_last", "compile", "capture", "dist_timeout", "benchmark",
             "progress", "tensorboard", "log_every_steps", "vis_every_epochs", "save_every_epochs", "save_every_steps",
             "keep_last", "max_bad_fraction", "resume", "out", "overwrite")


def config_for_run(path: str | Path | None = None, overrides: dict | None = None) -> PretrainConfig:
    """The configuration of a ``pretrain`` command: :func:`load_config` for a new run. Resuming one
    of sparkmim's runs (``resume`` ``auto``, or a ``checkpoint-*.pth``) takes the run's own settings
    (its ``config.yaml``, else its checkpoint's), and the recipe ``path`` is not read; ``overrides``
    may change only the :data:`RESUMABLE` options, and any other that differs from the run's is
    refused, naming it. ``--resume auto`` on a folder without a run starts a new run there only
    when ``data`` is given."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    resume = overrides.get("resume")
    if resume is None:
        return load_config(path, overrides)
    recipe_out = _read_yaml(path).get("out") if path is not None else None  # sparkmim demo: its recipe's folder
    out = overrides.get("out", recipe_out or PretrainConfig.out)
    folder = Path(out) if resume == "auto" else Path(resume).parent
    if resume != "auto" and not _is_run_checkpoint(Path(resume)):  # one of the paper's released files
        return load_config(path, overrides)
    saved = _saved_settings(folder, None if resume == "auto" else Path(resume))
    if saved is None:
        if "data" not in overrides:
            raise ConfigError(f"--resume auto: {folder} holds no run to resume (no config.yaml or checkpoint-*.pth); "
                              f"check --out, or give --data to start a new run there")
        return load_config(path, overrides)
    if saved.get("data") is None:  # runs before --data was required trained on the demo data
        saved["data"] = DEMO_DATA
    changed = {k: v for k, v in _typed(overrides).items() if k not in RESUMABLE and k in saved and v != saved[k]}
    if changed:
        k, v = next(iter(changed.items()))
        raise ConfigError(f"cannot resume the run in {folder} with {k} {v}: it was started with {k} {saved[k]}, and a "
                          f"resumed run keeps its settings (from {folder / 'config.yaml'}; only "
                          f"{', '.join(flag_of(o) for o in RESUMABLE[:4])}, the logging and checkpoint options may "
                          f"change); leave {k} out, or start a new run with another --out", [k])
    values = {**saved, **overrides, "out": str(out) if resume == "auto" else overrides.get("out", str(folder))}
    return _build(values, values)


def _is_run_checkpoint(path: Path) -> bool:
    import fnmatch

    from .checkpoint import CHECKPOINT_PATTERN

    return fnmatch.fnmatch(path.name, CHECKPOINT_PATTERN)


def _saved_settings(folder: Path, checkpoint: Path | None) -> dict | None:
    """The settings of the run in ``folder`` (its ``config.yaml``; else those saved in
    ``checkpoint`` or in the folder's newest checkpoint), limited to the options this version
    knows; None when the folder holds no run."""
    known = {f.name for f in fields(PretrainConfig)}
    if (folder / "config.yaml").is_file():
        saved = _read_yaml(folder / "config.yaml")
    else:
        from .checkpoint import checkpoint_paths
        from .weights import load_plain

        paths = [checkpoint] if checkpoint is not None else checkpoint_paths(folder)[-1:]
        if not paths or not paths[0].is_file():
            return None

        state = load_plain(paths[0], "checkpoint")
        saved = state.get("config") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            return None
    return _typed({k: v for k, v in saved.items() if k in known})


def parse_bool(v: str | bool) -> bool:
    """A boolean flag's value: the bare flag, or true/false, yes/no, on/off, 1/0."""
    if isinstance(v, bool):  # the bare flag (``--overwrite``)
        return v
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
        parser.add_argument("--config", help="YAML file with options, or a built-in recipe name (command-line flags "
                                             "override it)")
    types = _types(cls)
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        group = f.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options") if group else parser
        t = types[f.name]
        flag = flag_of(f.name)
        help_ = f"{f.metadata['help']} (default: {f.default})"
        if t is bool:  # ``--flag`` alone means true; ``--flag true|false`` too
            groups[group].add_argument(flag, type=parse_bool, nargs="?", const=True, metavar="{true,false}", default=None,
                                       help=help_)
        else:
            groups[group].add_argument(flag, type=t, default=None, choices=_choices(hints[f.name]) or None, help=help_)


def typed_options(args: argparse.Namespace, cls=None) -> dict:
    """The options of ``cls`` (default :class:`PretrainConfig`) given as flags on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls or PretrainConfig) if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The run's configuration from the command line (:func:`config_for_run`)."""
    return config_for_run(getattr(args, "config", None), typed_options(args))
