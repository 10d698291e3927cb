"""``sparkmim evaluate segment``: fine-tune a segmentation network whose encoder is the backbone
and report Dice per class on validation cases, for each weight source and seed.

Data: an nnU-Net raw dataset (``imagesTr/CASE_0000.nii.gz`` ..., ``labelsTr/CASE.nii.gz``) or a
folder with ``images/`` and ``labels/`` (``masks/`` is accepted too) holding files of the same
name (images: PNG, JPEG, TIFF ...; volumes: NIfTI, NumPy, TIFF). Labels are integer maps
(0 = background); a label map whose shape is not its image's is refused, naming both. The
labelled cases are held in memory: this is few-label evaluation, not a training pipeline.

The network: for ``nnunet:`` models nnU-Net's whole network of the plans (its own decoder, deep
supervision off), its encoder loaded exactly as ``sparkmim export RUN --nnunet PLANS`` gives it to
nnU-Net; for every other backbone, the backbone's feature maps (dense) into a light U-Net
decoder, the same blocks SparK decodes with (:class:`~sparkmim.decoder.LightDecoder`), one
projection per stage as skip input. MONAI's nets take their own encoders only, so they do not
fit "any backbone". Training: random crops of ``--input-size`` (``--input-depth`` for volumes)
with flips along every axis, soft Dice (foreground classes, over the batch) + cross-entropy,
warm-up and cosine decay. Validation: whole images (padded to the encoder's stride), volumes in
sliding windows (MONAI's ``sliding_window_inference``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import create_backbone, feature_modules_for
from ..config import ConfigError
from ..data import DataError
from ..decoder import _CONV, LightDecoder, deepest_width
from ..encoder import SparseEncoder
from ..modality import modality_for
from ..optim import Schedule
from ..sources import backbone_weights_of
from ..weights import load_encoder_weights
from .config import EvalConfig
from .finetune import optimizer_step

__all__ = ["find_cases", "split_cases", "SegmentationNet", "dice_ce_loss", "dice_per_class", "segment",
           "build_network", "format_segment_table"]

_LABEL_DIRS = ("labels", "masks")


# -- data -----------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def find_cases(root: str | Path, modality) -> list[tuple[str, tuple[Path, ...], Path]]:
    """``(name, image files (one per channel), label file)`` of each labelled case under ``root``,
    sorted by name: an nnU-Net raw dataset, or ``images/`` + ``labels/`` (or ``masks/``) pairs."""
    from ..inputs import data_input

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"labelled data folder {root} does not exist")
    if data_input(str(root)).kind == "nnunet-raw":  # what a folder is, decided where every --data is
        from ..volumes import read_nnunet_dataset

        files, _ = read_nnunet_dataset(root)
        ending = json.loads((root / "dataset.json").read_text()).get("file_ending", ".nii.gz")
        cases = []
        for channels in files:
            name = channels[0].name[: -len(ending) - 5]  # CASE_0000.nii.gz -> CASE
            label = root / "labelsTr" / f"{name}{ending}"
            if not label.is_file():
                raise DataError(f"nnU-Net dataset {root}: case {name} has no label map {label}")
            cases.append((name, channels, label))
        return sorted(cases)
    images = root / "images"
    labels = next((root / d for d in _LABEL_DIRS if (root / d).is_dir()), None)
    if not images.is_dir() or labels is None:
        raise DataError(f"{root} is no segmentation data set: give an nnU-Net raw dataset (dataset.json, imagesTr/, "
                        f"labelsTr/) or a folder with images/ and labels/ holding files of the same names")
    by_stem = {_stem(p): p for p in labels.iterdir() if p.is_file() and modality.is_sample_file(p)}
    cases, unlabelled = [], []
    for p in sorted(images.iterdir()):
        if not p.is_file() or not modality.is_sample_file(p):
            continue
        if _stem(p) in by_stem:
            cases.append((_stem(p), (p,), by_stem[_stem(p)]))
        else:
            unlabelled.append(p.name)
    if unlabelled:
        raise DataError(f"{len(unlabelled)} image(s) in {images} have no label map of the same name in {labels}, "
                        f"e.g. {unlabelled[0]}")
    if not cases:
        raise DataError(f"no {modality.name} with label maps in {images} and {labels}")
    return cases


def split_cases(cases: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split: ``(train, val)`` with ``fraction`` of the cases (at least one) held out,
    each part in name order."""
    if len(cases) < 2:
        raise DataError(f"{len(cases)} labelled case: give --val, or at least 2 cases to split")
    order = np.random.default_rng(seed).permutation(len(cases))
    held = set(order[: min(len(cases) - 1, max(1, round(len(cases) * fraction)))].tolist())
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def _read_case(case, modality, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(image (C, *S) float32, normalised; label (*S) int64)`` of one case; shapes checked."""
    name, files, label_file = case
    image, label = modality.read_labelled(files, label_file, cfg)
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise DataError(f"label map {label_file} is {tuple(label.shape)}, its image {files[0]} is "
                        f"{tuple(image.shape[1:])}: a label map must have its image's shape")
    rounded = np.rint(label)
    if not np.array_equal(rounded, label) or rounded.min() < 0:
        raise DataError(f"label map {label_file} holds values that are not labels (non-negative integers)")
    return np.ascontiguousarray(image), rounded.astype(np.int64)


# -- network ---------------------------------------------------------------------------------------
class SegmentationNet(nn.Module):
    """A backbone's feature maps (dense) into a light U-Net decoder: each stage projected (1x1 at
    the coarsest, 3x3 elsewhere) and added at the decoder block of its resolution; the head gives
    ``num_classes`` logits at the input's resolution."""

    def __init__(self, backbone: nn.Module, feature_modules, in_chans: int, num_classes: int, width: int = 0):
        super().__init__()
        self.encoder = SparseEncoder(backbone, feature_modules, in_chans=in_chans, check=False)
        enc = self.encoder
        width = width or deepest_width(enc.channels[-1], enc.patch_size, enc.factors)
        self.decoder = LightDecoder(width, out_channels=num_classes, patch_size=enc.patch_size, factors=enc.factors)
        conv = _CONV[enc.spatial_dims]
        self.levels = [self.decoder.factors.index(f) for f in enc.factors]
        self.proj = nn.ModuleList(
            conv(c, self.decoder.widths[lvl], kernel_size=1 if lvl == 0 else 3, padding=0 if lvl == 0 else 1)
            for c, lvl in zip(enc.channels, self.levels))
        self.patch_size = enc.patch_size

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        inputs: list[Tensor | None] = [None] * len(self.decoder.blocks)
        for f, lvl, proj in zip(features, self.levels, self.proj):
            inputs[lvl] = proj(f)
        return self.decoder(inputs)


def build_network(cfg: EvalConfig, source: str, seed: int, num_classes: int) -> tuple[nn.Module, dict]:
    """The segmentation network for ``source`` (random init seeded by ``seed``), and a report of
    the keys loaded from the source."""
    torch.manual_seed(seed)
    report: dict = {}
    if cfg.model.startswith("nnunet:"):
        from ..nnunet import create_nnunet, nnunet_state, stage_strides

        network = create_nnunet(cfg.model.split(":", 1)[1], cfg.in_chans, num_classes)
        modality_for(cfg.model).check_network(network, cfg.model)
        if source == "pretrained":
            raise ConfigError(f"{cfg.model} has no published pretrained weights", ["weights"])
        if source != "random":
            state, keys = nnunet_state(backbone_weights_of(source), network)  # what the nnU-Net export holds
            network.load_state_dict(state, strict=True)
            report = {"keys_matched": len(keys["from_run"])}
        stride = tuple(math.prod(s[i] for s in stage_strides(cfg.model.split(":", 1)[1])) for i in range(3))
        network.patch_size = stride
        return network, report
    backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, pretrained=source == "pretrained")
    modality_for(cfg.model).check_network(backbone, cfg.model)
    if source not in ("random", "pretrained"):
        report = {"keys_matched": len(load_encoder_weights(backbone, backbone_weights_of(source), strict=True)["matched"])}
    network = SegmentationNet(backbone, feature_modules_for(cfg.model), cfg.in_chans, num_classes, cfg.decoder_width)
    return network, report


# -- loss and metric -------------------------------------------------------------------------------
def dice_ce_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Cross-entropy plus ``1 - soft Dice`` averaged over the foreground classes, each class's
    Dice taken over the whole batch (nnU-Net's batch Dice without the background)."""
    ce = F.cross_entropy(logits, target)
    probs = (logits if logits.dtype == torch.float64 else logits.float()).softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    dice = (2 * inter + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return ce + (1 - dice.mean())


def dice_per_class(pred: Tensor, truth: Tensor, num_classes: int) -> list[float]:
    """Dice ``2|P & T| / (|P| + |T|)`` of each foreground class (1 .. num_classes - 1) of one
    case; NaN for a class in neither map (left out of means)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        total = int(p.sum()) + int(t.sum())
        out.append(float("nan") if total == 0 else 2.0 * int((p & t).sum()) / total)
    return out


# -- training and validation -----------------------------------------------------------------------
def _crop(image: np.ndarray, label: np.ndarray, size: tuple[int, ...], rng: np.random.Generator):
    """A random crop of ``size`` (padded with the image's minimum and label 0 where the case is
    smaller), flipped along each spatial axis with probability 0.5."""
    pads = [max(0, s - n) for s, n in zip(size, label.shape)]
    if any(pads):
        width = [(p // 2, p - p // 2) for p in pads]
        image = np.pad(image, [(0, 0), *width], constant_values=float(image.min()))
        label = np.pad(label, width)
    starts = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, label.shape)]
    region = tuple(slice(a, a + s) for a, s in zip(starts, size))
    image, label = image[(slice(None), *region)], label[region]
    for axis in range(label.ndim):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


@torch.no_grad()
def _predict(network: nn.Module, image: np.ndarray, crop: tuple[int, ...], stride: tuple[int, ...], modality,
             overlap: float, device) -> Tensor:
    """The label map predicted for one whole case."""
    logits = modality.predict_case(network, torch.from_numpy(image)[None].to(device), crop, stride, overlap)
    return logits.argmax(1)[0].cpu()


def _train_one(network: nn.Module, train, cfg: EvalConfig, crop, batch: int, device, seed: int, label: str):
    """Fine-tune ``network`` on ``train`` ``[(image, label)]``; the loss of each step."""
    from tqdm import tqdm

    steps = cfg.steps or 300
    if cfg.optimizer == "sgd":
        peak = cfg.lr or 1e-2
        opt = torch.optim.SGD(network.parameters(), lr=peak, momentum=0.99, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        from ..optim import lamb

        peak = cfg.lr or 1e-3
        decay = [p for p in network.parameters() if p.ndim > 1]
        other = [p for p in network.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        opt = lamb(groups, lr=peak) if cfg.optimizer == "lamb" else torch.optim.AdamW(groups, lr=peak)
    sched = Schedule(peak, steps, max(1, steps // 10), warmup_start_ratio=0.0, final_lr_ratio=0.01,
                     wd=cfg.weight_decay, wd_end=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    losses = []
    network.train()
    bar = tqdm(total=steps, desc=f"{label}: segment", disable=not cfg.progress, leave=False)
    for step in range(steps):
        pairs = [_crop(*train[int(rng.integers(len(train)))], crop, rng) for _ in range(batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)
        y = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        value = optimizer_step(network, opt, dice_ce_loss(network(x), y), step, "segmentation")
        losses.append(round(value, 5))
        bar.update()
        bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    return losses


def _validate(network, val, num_classes, crop, stride, modality, cfg, device):
    network.eval()
    per_case, preds = [], []
    for image, truth in val:
        pred = _predict(network, image, crop, stride, modality, cfg.overlap, device)
        per_case.append(dice_per_class(pred, torch.from_numpy(truth), num_classes))
        preds.append(pred.numpy())
    table = np.asarray(per_case, dtype=np.float64)
    with np.errstate(all="ignore"):
        per_class = [None if np.isnan(table[:, c]).all() else float(np.nanmean(table[:, c]))
                     for c in range(num_classes - 1)]
    known = [v for v in per_class if v is not None]
    return per_class, (float(np.mean(known)) if known else None), preds


def _picture(path: Path, val, preds, modality, count: int = 3) -> None:
    """A few validation slices: image, truth, prediction (the slice with the most foreground)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(val))
    fig, axes = plt.subplots(count, 3, figsize=(9, 3 * count), squeeze=False)
    for row, ((image, truth), pred) in enumerate(zip(val[:count], preds[:count])):
        image, truth, pred = modality.display_slice(image, truth, pred)
        top = int(max(truth.max(), pred.max(), 1))
        for col, (shown, title) in enumerate([(image[0], "image"), (truth, "truth"), (pred, "prediction")]):
            ax = axes[row][col]
            ax.imshow(shown, cmap="gray" if col == 0 else "tab10", vmin=None if col == 0 else 0,
                      vmax=None if col == 0 else max(top, 9), interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def segment(cfg: EvalConfig, device) -> dict:
    """``evaluate segment``: every weight source, every seed; ``results.json`` in ``cfg.out``."""
    from ..weights import atomic_write

    modality = modality_for(cfg.model)
    modality.check(cfg)
    crop = modality.input_shape(cfg)
    cases = find_cases(cfg.data, modality)
    if cfg.val:
        train_cases, val_cases = cases, find_cases(cfg.val, modality)
    else:
        train_cases, val_cases = split_cases(cases, cfg.val_fraction, cfg.seed)
    if cfg.labels:
        if cfg.labels > len(train_cases):
            raise ConfigError(f"--labels {cfg.labels}: the training part holds {len(train_cases)} labelled cases",
                              ["labels"])
        train_cases = train_cases[: cfg.labels]
    train = [_read_case(c, modality, cfg) for c in train_cases]
    val = [_read_case(c, modality, cfg) for c in val_cases]
    num_classes = int(max(int(lab.max()) for _, lab in train + val)) + 1
    if num_classes < 2:
        raise DataError("the label maps hold background (0) only: nothing to segment")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(cfg), "mode": "segment", "classes": num_classes,
               "train_cases": [c[0] for c in train_cases], "val_cases": [c[0] for c in val_cases], "results": []}
    print(json.dumps({"event": "start", "mode": "segment", "model": cfg.model, "classes": num_classes,
                      "train_cases": len(train), "val_cases": len(val), "crop": list(crop),
                      "sources": [label for label, _ in cfg.sources], "seeds": cfg.seed_list(),
                      "device": str(device)}), flush=True)
    for label, source in cfg.sources:
        for seed in cfg.seed_list():
            started = time.perf_counter()
            network, report = build_network(cfg, source, seed, num_classes)
            stride = tuple(network.patch_size)
            if any(c % s for c, s in zip(crop, stride)):
                raise ConfigError(f"the crop {'x'.join(map(str, crop))} must be a multiple of the encoder's stride "
                                  f"{'x'.join(map(str, stride))} (--input-size, --input-depth)", ["input_size"])
            network = network.to(device)
            losses = _train_one(network, train, cfg, crop, cfg.batch(modality), device, seed, label)
            per_class, mean, preds = _validate(network, val, num_classes, crop, stride, modality, cfg, device)
            row = {"weights": label, "source": source, "seed": seed, **report, "dice": mean,
                   "dice_per_class": per_class, "loss_first": losses[0], "loss_last": losses[-1],
                   "seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps({"event": "result", **row}), flush=True)
            results["results"].append({**row, "loss_per_step": losses})
            if seed == cfg.seed_list()[0]:
                _picture(out / f"slices-{label}.png", val, preds, modality)
            results["summary"] = _summary(results["results"])
            text = json.dumps(results, indent=1)
            atomic_write(out / "results.json", lambda tmp, text=text: tmp.write_text(text))
    print(format_segment_table(results), flush=True)
    return results


def _summary(rows: list[dict]) -> list[dict]:
    """Per weight source: the mean and spread (sample standard deviation) of Dice over seeds."""
    out = []
    for label in dict.fromkeys(r["weights"] for r in rows):
        values = [r["dice"] for r in rows if r["weights"] == label and r["dice"] is not None]
        out.append({"weights": label, "seeds": len(values), "dice_mean": float(np.mean(values)) if values else None,
                    "dice_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "dice_per_seed": values})
    return out


def format_segment_table(results: dict) -> str:
    """Dice (%) per weight source: mean and spread over seeds."""
    head = ["weights", "dice (%)", "spread", "seeds"]
    lines = [[s["weights"], "-" if s["dice_mean"] is None else f"{100 * s['dice_mean']:.2f}",
              f"{100 * s['dice_std']:.2f}", str(s["seeds"])] for s in results.get("summary", [])]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    title = (f"segment: mean foreground Dice on {len(results['val_cases'])} validation cases, "
             f"{len(results['train_cases'])} labelled, {results['config']['model']}")
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])
