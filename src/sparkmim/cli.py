"""Command line: ``sparkmim pretrain | demo | export | reconstruct | evaluate | handoff | models``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .config import RECIPES, add_config_arguments, parse_bool

__all__ = ["main", "build_parser", "RECIPES"]


def _pretrain(args: argparse.Namespace, recipe: str | None = None) -> int:
    from .config import config_from_args, recipe_path
    from .distributed import launch_info
    from .train import pretrain

    args.config = recipe_path(args.config or recipe)
    cfg = config_from_args(args)
    summary = pretrain(cfg)
    if launch_info().main:  # under torchrun, one summary from rank 0
        print(json.dumps(summary), flush=True)
    return 0


def _run_checkpoint(source, command: str):
    """The training checkpoint of a run folder or checkpoint ``source`` (:mod:`sparkmim.sources`);
    another kind of file is refused, saying what it is."""
    from .sources import checkpoint_of, kind_of

    found = checkpoint_of(source)
    if found is None:
        raise ValueError(f"{command} needs a run folder or one of its checkpoint-*.pth files; {source.path} is "
                         f"{kind_of(source)}")
    return found


def _export(args: argparse.Namespace) -> int:
    from .backbones import create_backbone
    from .sources import EncoderWeights, ReleasedRun, read_source
    from .weights import export_backbone, export_paths, load_encoder_weights

    source = read_source(args.run)
    if isinstance(source, (ReleasedRun, EncoderWeights)):
        return _export_file(args, source)
    ckpt = _run_checkpoint(source, "export")
    cfg = ckpt.pretrain_config()
    if args.nnunet:
        return _export_nnunet(args, ckpt, cfg)
    backbone = create_backbone(cfg.model, in_chans=cfg.in_chans)
    load_encoder_weights(backbone, ckpt.backbone_weights(), strict=True)
    fmt = args.format
    out = Path(args.out) if args.out else ckpt.path.parent / f"encoder.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    replaced = [str(p) for p in export_paths(backbone, out) if p.exists()]
    for path in replaced:
        warnings.warn(f"replacing the existing {path} with the weights of {ckpt.path}", stacklevel=1)
    mean, std = ckpt.stats()
    timm_folder = export_backbone(backbone, out, mean=mean, std=std, input_size=cfg.input_size, architecture=cfg.model)
    fresh = create_backbone(cfg.model, in_chans=cfg.in_chans)  # freshly built original model: must load strictly
    report = load_encoder_weights(fresh, out, strict=True)
    print(json.dumps({"event": "export", "checkpoint": str(ckpt.path), "weights": str(out), "model": cfg.model,
                      "matched": len(report["matched"]), "missing": report["missing"],
                      "unexpected": report["unexpected"], "shape_mismatch": report["shape_mismatch"],
                      "strict_load": "ok", "timm_folder": timm_folder and str(timm_folder), "replaced": replaced}),
          flush=True)
    return 0


def _export_file(args: argparse.Namespace, source) -> int:
    """``export FILE`` of a released file or of encoder weights: the backbone's weights with its
    own keys (ConvNeXt keys renamed to timm's), loaded strictly into a fresh model, written as
    sparkmim exports are."""
    from .backbones import create_backbone
    from .data import default_stats
    from .sources import ReleasedRun, kind_of
    from .weights import export_backbone, load_encoder_weights

    released = isinstance(source, ReleasedRun)
    model = args.model or source.architecture  # a released run's arch, a sparkmim export's recorded model
    if model is None:
        raise ValueError(f"{source.path} is an encoder-only weights file: name its backbone, e.g. --model resnet50")
    backbone = create_backbone(model, in_chans=3)
    report = load_encoder_weights(backbone, source.backbone_weights(), strict=True)
    out = Path(args.out) if args.out else source.path.with_name(f"{source.path.stem}.encoder.safetensors")
    mean, std = default_stats(3)
    timm_folder = export_backbone(backbone, out, mean=mean, std=std,
                                  input_size=source.input_size if released else 224, architecture=model)
    print(json.dumps({"event": "export", "source": str(source.path), "kind": kind_of(source), "weights": str(out), "model": model, "matched": len(report["matched"]),
                      "strict_load": "ok", "timm_folder": timm_folder and str(timm_folder)}), flush=True)
    return 0


def _export_nnunet(args: argparse.Namespace, ckpt, cfg) -> int:
    """``export --nnunet PLANS``: a checkpoint nnU-Net v2's ``-pretrained_weights`` loads."""
    from .nnunet import nnunet_checkpoint
    from .weights import load_plain

    if not cfg.model.startswith("nnunet:"):
        raise ValueError(f"the run pre-trained {cfg.model}, not one of nnU-Net's networks: --nnunet exports runs of "
                         f"--model nnunet:PRESET or nnunet:PLANS.json")
    out = Path(args.out) if args.out else ckpt.path.parent / f"nnunet-{args.configuration}.pth"
    if out.exists():
        warnings.warn(f"replacing the existing {out} with the weights of {ckpt.path}", stacklevel=1)
    report = nnunet_checkpoint(ckpt.backbone_weights(), args.nnunet, args.configuration, cfg.in_chans, out,
                               source={"checkpoint": str(ckpt.path), "model": cfg.model, "epoch": ckpt.progress.epoch})
    written = load_plain(out, "nnU-Net checkpoint")["network_weights"]  # read back as plain data
    print(json.dumps({"event": "export", "format": "nnunet", "checkpoint": str(ckpt.path), "weights": str(out),
                      "model": cfg.model, "plans": str(args.nnunet), "configuration": args.configuration,
                      "keys": len(written), "from_run": len(report["from_run"]),
                      "nnunet_init": len(report["nnunet_init"]), "seg_layers_skipped_by_nnunet": len(report["seg_layers"]),
                      "use": f"nnUNetv2_train DATASET {args.configuration} FOLD -pretrained_weights {out}"}), flush=True)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    """``sparkmim preprocess DATA --out CACHE`` (:func:`sparkmim.api.preprocess`)."""
    from .api import preprocess

    summary = preprocess(args.data, args.out, in_chans=args.in_chans, spacing=args.spacing,
                         foreground_crop=args.foreground_crop, workers=args.workers, progress=args.progress)
    print(json.dumps(summary), flush=True)
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .data import DataError
    from .modality import modality_for
    from .sources import read_source
    from .train.setup import build_model
    from .visualize import compose_rows, grid_rows, save_grid

    ckpt = _run_checkpoint(read_source(args.checkpoint), "reconstruct")
    cfg = ckpt.pretrain_config()
    modality = modality_for(cfg.model)
    model = build_model(cfg, modality)
    model.load_state_dict(ckpt.model)
    model.eval()
    size = args.size or cfg.input_size
    mean, std = ckpt.stats()
    # images: the short side resized to size, the aspect kept; volumes: resized whole; normalised as in the run
    tf, load = modality.reconstruct_transform(cfg, size, mean, std, model.patch_size)

    def read(path: str):
        if modality.other_kind([Path(path)]):
            raise DataError(modality.mismatch(Path(path), cfg.model))
        try:
            return load(path, cfg.in_chans)
        except Exception as e:  # missing, corrupt, not an image: one line naming the file
            raise ValueError(f"cannot read {modality.noun} {path}: {' '.join(str(e).split()) or type(e).__name__}") from e

    masks = torch.Generator().manual_seed(args.seed)
    rows, labels = [], []
    for path in args.images:  # one at a time: each keeps its own shape
        image = tf(read(path))[None]
        rec = model.reconstruct(image, visible=model.draw_masks(image, masks, ratio=args.mask_ratio))
        tiles, names = grid_rows(rec, mean, std, 1, names=[Path(path).name], modality=modality)
        rows += tiles
        labels += names or []
    out = save_grid(compose_rows(rows, labels or None), args.out)
    print(json.dumps({"event": "reconstruct", "checkpoint": str(ckpt.path), "images": len(args.images), "grid": str(out)}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .eval.config import EvalConfig, settings_from_runs
    from .eval.run import evaluate

    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if getattr(args, f.name, None) is not None}
    run = settings_from_runs(values.get("weights", ""))
    # the model (and its input) of the run being evaluated, unless given; another --model takes none
    if run and values.get("model", run.get("model")) == run.get("model"):
        from_run = {k: v for k, v in run.items() if k not in values}
        if from_run:
            print(json.dumps({"event": "settings", "note": "taken from the run's config.yaml", **from_run}), flush=True)
        values.update(from_run)
    if "in_chans" not in values and values.get("data"):  # else the channels the data set declares
        from .eval.config import data_channels

        declared = data_channels(values["data"])
        if declared:
            print(json.dumps({"event": "settings", "note": "channels from the data set", "in_chans": declared}),
                  flush=True)
            values["in_chans"] = declared
    evaluate(EvalConfig(**values))
    return 0


def _handoff(args: argparse.Namespace) -> int:
    from .handoff import save_torchvision

    report = save_torchvision(args.weights, args.arch, args.out)
    print(json.dumps({"event": "handoff", "weights": args.weights, "arch": f"torchvision:{args.arch}", "out": args.out,
                      "matched": len(report["matched"]), "missing": report["missing"],
                      "unexpected": report["unexpected"], "shape_mismatch": report["shape_mismatch"],
                      "classifier_kept": report["classifier_kept"]}), flush=True)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .backbones import (
        TESTED_MONAI,
        TESTED_NNUNET,
        TESTED_TIMM,
        TESTED_TORCHVISION,
        TESTED_TORCHVISION_VIDEO,
    )

    for name, family in TESTED_TIMM:
        if not args.filter or args.filter in name or args.filter.lower() in family.lower():
            print(f"timm:{name:28s} {family}")
    for name in TESTED_TORCHVISION:
        if not args.filter or args.filter in name:
            print(f"torchvision:{name}")
    for name in TESTED_TORCHVISION_VIDEO:
        if not args.filter or args.filter in name or args.filter.lower() in "video 3-d":
            print(f"torchvision:{name:21s} video clips (3-D)")
    for name in TESTED_MONAI:
        if not args.filter or args.filter in name or args.filter.lower() in "monai volumes 3-d":
            print(f"monai:{name:27s} volumes (3-D, needs sparkmim[3d])")
    for name in TESTED_NNUNET:
        if not args.filter or args.filter in name or args.filter.lower() in "nnunet nnu-net volumes 3-d":
            print(f"nnunet:{name:26s} volumes (3-D, nnU-Net's network; needs dynamic-network-architectures)")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are two lines: a short usage (``--help`` lists the options)
    and the error, with the closest subcommand for a mistyped one."""

    def format_usage(self) -> str:
        if self._subparsers is not None:
            return f"usage: {self.prog} COMMAND [options] (--help lists the commands)\n"
        if not any(a.option_strings for a in self._actions if a.dest != "help"):
            return super().format_usage()
        positionals = " ".join(a.metavar or a.dest for a in self._actions if not a.option_strings)
        return f"usage: {self.prog} [options]{' ' + positionals if positionals else ''} (--help lists the options)\n"

    def error(self, message: str):
        import difflib
        import re

        wrong = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if wrong:
            choices = [c.strip(" '") for c in wrong.group(2).split(",")]
            close = difflib.get_close_matches(wrong.group(1), choices, n=1, cutoff=0.5)
            if close:
                message += f"; did you mean {close[0]}?"
        self.exit(2, f"{self.format_usage()}{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sparkmim", description="SparK masked image modeling for any convnet.")
    parser.add_argument("--version", action="version", version=f"sparkmim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train an encoder on a folder of images",
                       description="Pre-train with SparK. Options come from the defaults (the paper's), then "
                                   "--config YAML (a path or a built-in recipe: demo, demo3d, resnet50, "
                                   "convnext_small, one_gpu), then these flags.")
    add_config_arguments(p)
    p.set_defaults(func=_pretrain)

    d = sub.add_parser("demo", help="short pre-training on the built-in demo photos (the 'demo' recipe)",
                       description="The 'demo' recipe: ResNet-18 at 96 px on the demo photographs, a few minutes "
                                   "on a laptop CPU. With --3d the 'demo3d' recipe: a small MONAI 3-D ResNet on "
                                   "random crops of the MRI volumes shipped with nibabel (needs sparkmim[3d]). Any "
                                   "pretrain flag overrides the recipe.")
    d.add_argument("--3d", dest="three_d", action="store_true", help="the 3-D demo (volumes; the 'demo3d' recipe)")
    add_config_arguments(d)
    d.set_defaults(func=lambda a: _pretrain(a, recipe="demo3d" if a.three_d else "demo"))

    e = sub.add_parser("export", help="write the encoder weights of a run or checkpoint with the original keys")
    e.add_argument("run", help="run directory (newest checkpoint), checkpoint file, or one of the paper's released "
                               "files (_withdecoder_..._spark_style.pth, _timm_style.pth with --model)")
    e.add_argument("--out", help="output file (default: RUN/encoder.safetensors)")
    e.add_argument("--format", choices=["safetensors", "pth"], default="safetensors")
    e.add_argument("--nnunet", metavar="PLANS.json",
                   help="write a checkpoint for nnUNetv2_train -pretrained_weights instead: the network of this nnU-Net "
                        "plans file with the run's encoder and nnU-Net's own decoder initialisation (default out: "
                        "RUN/nnunet-CONFIGURATION.pth)")
    e.add_argument("--configuration", default="3d_fullres", help="the plans' configuration for --nnunet")
    e.add_argument("--model", help="the backbone of an encoder-only released file (e.g. resnet50_1kpretrained_"
                                   "timm_style.pth); a _withdecoder_ file names its own")
    e.set_defaults(func=_export)

    c = sub.add_parser("preprocess", help="read volumes once into a cache that pre-training reads by region",
                       description="Read each volume (or nnU-Net case) once: channels stacked, cropped to the "
                                   "foreground and resampled as asked, written as a chunked compressed array with its "
                                   "statistics and sources; then `sparkmim pretrain --data CACHE` reads only each "
                                   "crop's region. A rerun completes an interrupted build and rebuilds the volumes "
                                   "whose source or settings changed.")
    c.add_argument("data", help="a folder of volumes (searched recursively), a text file of paths, or an nnU-Net raw "
                                "dataset folder")
    c.add_argument("--out", required=True, help="the cache folder")
    c.add_argument("--in-chans", type=int, help="channels per volume (default: an nnU-Net dataset's, else 1)")
    c.add_argument("--spacing", help="resample NIfTI volumes to this voxel size, 'X,Y,Z' (as pretrain --spacing)")
    c.add_argument("--foreground-crop", type=parse_bool, nargs="?", const=True, default=False, metavar="{true,false}",
                   help="crop each volume to the box of its non-zero voxels (as pretrain --foreground-crop)")
    c.add_argument("--workers", type=int, default=0, help="processes reading volumes in parallel (0: this one)")
    c.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True, metavar="{true,false}",
                   help="show a progress bar")
    c.set_defaults(func=_preprocess)

    r = sub.add_parser("reconstruct", help="reconstruction grid (input | masked | reconstruction) for images "
                                           "(volumes: their three central slices)")
    r.add_argument("checkpoint", help="run directory or checkpoint file")
    r.add_argument("images", nargs="+", help="image files (volume files for a 3-D run)")
    r.add_argument("--out", default="reconstruction.png")
    r.add_argument("--size", type=int, help="images: the short side, the aspect ratio kept (each side cropped to a "
                                             "multiple of the patch); volumes: height and width, the run's depth "
                                             "kept (default: the run's input size)")
    r.add_argument("--mask-ratio", type=float, help="default: the run's")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_reconstruct)

    from .eval.config import MODES, EvalConfig

    v = sub.add_parser("evaluate", help="k-NN, linear probe, fine-tuning accuracy or segmentation Dice on labelled data",
                       description="Evaluate backbone weights on a labelled folder (one sub-folder per class; for "
                                   "segment, images and label maps). "
                                   "--weights takes several sources (random, pretrained, sparkmim runs or exported "
                                   "files), evaluated the same way and shown in one table; results.json goes to --out.")
    v.add_argument("mode", choices=MODES, help="knn: weighted k-NN on pooled features; linear: BatchNorm + linear "
                                               "head on frozen features; finetune: full fine-tuning; segment: "
                                               "fine-tune a U-Net on label maps, Dice per class")
    add_config_arguments(v, EvalConfig, skip=("mode",))
    v.set_defaults(func=_evaluate)

    h = sub.add_parser("handoff", help="rewrite exported weights with torchvision's keys (for detection models)",
                       description="Write exported ResNet or ConvNeXt weights as a state dict of torchvision model "
                                   "ARCH (timm ConvNeXt keys are renamed), with a key report. In Python, "
                                   "sparkmim.handoff.fasterrcnn / maskrcnn build detectors directly.")
    h.add_argument("weights", help="exported .safetensors/.pth, run folder or checkpoint")
    h.add_argument("--arch", required=True, help="torchvision model, e.g. resnet50 or convnext_tiny")
    h.add_argument("--out", required=True, help="output .pth (torch.save of the state dict)")
    h.set_defaults(func=_handoff)

    m = sub.add_parser("models", help="list the backbones tested with sparkmim")
    m.add_argument("--filter", help="substring of the name or family")
    m.set_defaults(func=_models)
    parser.commands = sub.choices  # each subcommand's parser, for its own error messages
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is reported by its subcommand (its usage, and the closest
    option names: ``did you mean --batch-size?``), not by the top-level parser."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    command = parser.commands[args.command]
    options = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for item in (u.split("=", 1)[0] for u in unknown if u.startswith("-")):
        close = difflib.get_close_matches(item if item.startswith("--") else "-" + item, options, n=2, cutoff=0.6)
        if close:
            hints.append(f"did you mean {' or '.join(close)}?")
    command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    from .config import ConfigError

    def one_line(message, category, filename, lineno, line=None):  # warnings as one line each, no source
        return f"sparkmim {args.command}: warning: {message}\n"

    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line
    known: tuple[type, ...] = (ValueError, OSError)
    try:
        from .sparse import SparseSemanticsError
        from .train.loop import NonFiniteLossError

        known = (ValueError, OSError, SparseSemanticsError, NonFiniteLossError)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sparkmim {args.command}: interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    except Exception as e:
        broken = _broken_install(e)
        if broken is None and not isinstance(e, known):
            raise
        # ConfigError, DataError, CheckpointError, KeyMismatchError are ValueErrors; WriteError and
        # FileNotFoundError are OSErrors. An option is named as the user gave it: a flag typed on
        # the command line as the flag, one from a YAML recipe by its key.
        typed = {k for k in vars(args) if getattr(args, k) is not None}
        message = broken or (e.for_flags(typed) if isinstance(e, ConfigError) else e)
        print(f"sparkmim {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


def _broken_install(error: BaseException) -> str | None:
    """One line for an installed torchvision that does not fit the installed torch (importing it
    fails with ``operator torchvision::nms does not exist`` or the like), naming what to
    reinstall; None for any other error."""
    from importlib import metadata

    text = " ".join(str(error).split())
    if "torchvision::" not in text and not (isinstance(error, ImportError) and error.name == "torchvision"):
        return None
    try:
        torch_version, vision = metadata.version("torch"), metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return f"torchvision cannot be imported ({text}): pip install torchvision"
    base = torch_version.split("+")[0]
    major, minor = (int(v) for v in base.split(".")[:2])
    match = f" 'torchvision=={0}.{minor + 15}.*'" if major == 2 else " torchvision"
    return (f"the installed torchvision {vision} does not work with the installed torch {torch_version} ({text}): "
            f"reinstall the pair together, e.g. pip install torch=={base}{match}")


if __name__ == "__main__":
    sys.exit(main())
