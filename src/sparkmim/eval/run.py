"""``sparkmim evaluate``: every weight source through the same data, split, seed and recipe, and
one table comparing them.

The same command evaluates several weight sources side by side (``random`` initialisation, the
library's ``pretrained`` weights, or weights exported by sparkmim), so a table shows whether
pre-training helped."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..backbones import create_backbone, feature_modules_for
from ..config import ConfigError
from ..devices import resolve_device
from ..encoder import SparseEncoder
from ..modality import modality_for
from ..sources import backbone_weights_of
from ..weights import atomic_write, load_encoder_weights
from .config import EvalConfig
from .data import LabelledSamples, build_splits
from .finetune import finetune
from .probes import extract_features, knn_accuracy, linear_probe

__all__ = ["evaluate", "build_backbone", "format_table"]


def build_backbone(cfg: EvalConfig, source: str, seed: int) -> tuple[nn.Module, dict | None]:
    """The backbone (classifier removed) with the weights of ``source``; random init is seeded."""
    torch.manual_seed(seed)
    drop_path = cfg.drop_path if cfg.mode == "finetune" else None
    if source == "pretrained":
        return create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=drop_path, pretrained=True), None
    backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=drop_path)
    modality_for(cfg.model).check_network(backbone, cfg.model)
    if source == "random":
        return backbone, None
    report = load_encoder_weights(backbone, backbone_weights_of(source), strict=True)
    return backbone, {"matched": len(report["matched"])}


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every weight source of ``cfg`` and write ``results.json`` in ``cfg.out``."""
    device = resolve_device(cfg.device)
    if cfg.mode == "segment":
        from .segment import segment

        return segment(cfg, device)
    sources = cfg.sources
    modality = modality_for(cfg.model)
    modality.check(cfg)
    if cfg.cutmix > 0 and not modality.cutmix:
        raise ConfigError(f"cutmix cuts 2-D boxes: use --cutmix 0 with {modality.name} (mixup works)")
    train_samples, val_samples, classes = build_splits(cfg, modality)
    mean, std = modality.norm_stats(cfg, [p for p, _ in train_samples])
    eval_tf = modality.eval_transform(cfg, mean, std)
    make = partial(LabelledSamples, classes=classes, channels=cfg.in_chans, modality=modality)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(cfg), "classes": classes, "train_images": len(train_samples),
               "val_images": len(val_samples), "norm": {"mean": mean, "std": std}, "results": []}
    print(json.dumps({"event": "start", "mode": cfg.mode, "model": cfg.model, "classes": len(classes),
                      "train_images": len(train_samples), "val_images": len(val_samples),
                      "sources": [label for label, _ in sources], "device": str(device)}), flush=True)
    loader_kw = dict(batch_size=cfg.batch(), num_workers=cfg.workers, pin_memory=device.type == "cuda")
    for label, source in sources:
        started = time.perf_counter()
        backbone, report = build_backbone(cfg, source, cfg.seed)
        row: dict = {"weights": label, "source": source}
        if report:
            row["keys_matched"] = report["matched"]
        if cfg.mode == "finetune":
            train_tf = modality.finetune_transform(cfg, mean, std)
            history = finetune(backbone, make(train_samples, transform=train_tf),
                               make(val_samples, transform=eval_tf), len(classes), cfg, device, cfg.seed, cfg.progress)
            rows = [{**row, "top1": history[-1], "best_top1": max(history), "top1_per_epoch": history}]
        else:
            encoder = SparseEncoder(backbone, feature_modules_for(cfg.model), in_chans=cfg.in_chans, check=False).to(device)
            tr = torch.utils.data.DataLoader(make(train_samples, transform=eval_tf), **loader_kw)
            va = torch.utils.data.DataLoader(make(val_samples, transform=eval_tf), **loader_kw)
            if cfg.bn_stats == "data":  # running statistics of whole training images, not the saved ones
                torch.optim.swa_utils.update_bn(tr, encoder.model, device)
            train_f, train_y = extract_features(encoder, tr, device, cfg.progress, f"{label}: train features")
            val_f, val_y = extract_features(encoder, va, device, cfg.progress, f"{label}: val features")
            rows = [{**row, "stage": stage, **_probe(cfg, train_f[stage - 1], train_y, val_f[stage - 1], val_y,
                                                      len(classes))}
                    for stage in cfg.stages(len(train_f))]
        seconds = round(time.perf_counter() - started, 1)
        for finished in rows:
            finished["seconds"] = seconds
            results["results"].append(finished)
            print(json.dumps({"event": "result", **{k: v for k, v in finished.items() if k != "top1_per_epoch"}}),
                  flush=True)
        _write_json(out / "results.json", results)
    print(format_table(results), flush=True)
    return results


def _probe(cfg: EvalConfig, train_f, train_y, val_f, val_y, num_classes: int) -> dict:
    """k-NN accuracies, or the linear probe's per-epoch accuracies, on one stage's features."""
    if cfg.mode == "knn":
        accs = knn_accuracy(train_f, train_y, val_f, val_y, cfg.ks, cfg.temperature, num_classes)
        return {**{f"top1_k{k}": a for k, a in accs.items()}, "top1": accs[cfg.ks[0]]}
    history = linear_probe(train_f, train_y, val_f, val_y, num_classes, cfg, cfg.seed, cfg.progress)
    return {"top1": history[-1], "best_top1": max(history), "top1_per_epoch": history}


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def format_table(results: dict) -> str:
    """The results as an aligned text table (one row per weight source)."""
    mode = results["config"]["mode"]
    rows = results["results"]
    if mode == "knn":
        cols = [c for c in rows[0] if c.startswith("top1_k")]
    else:
        cols = ["top1", "best_top1"]
    staged = results["config"].get("stage", "last") != "last" and mode != "finetune"  # a column for the stage
    header = ["weights", *(["stage"] if staged else []), *cols, "seconds"]
    lines = [[r["weights"], *([r["stage"]] if staged else []), *(f"{r[c]:.2f}" for c in cols), f"{r['seconds']:.0f}"]
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    title = f"{mode} top-1 (%) on {results['val_images']} validation images, {results['config']['model']}"
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])
