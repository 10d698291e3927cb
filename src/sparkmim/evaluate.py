"""Downstream evaluation of a backbone on a labelled image folder: k-NN, linear probe, fine-tuning.

The same command evaluates several weight sources side by side (``random`` initialisation, the
library's ``pretrained`` weights, or weights exported by sparkmim), so a table shows whether
pre-training helped. Every source goes through the same data, split, seed and recipe.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import create_backbone
from .checkpoint import atomic_write, load_encoder_weights, read_weights
from .config import _opt
from .data import IMAGE_EXTENSIONS, compute_stats, default_stats, load_image
from .encoder import SparseEncoder
from .engine import resolve_device
from .optim import Schedule, clip_grad_norm_, lamb

__all__ = ["EvalConfig", "LabelledImages", "evaluate", "knn_accuracy", "weights_state", "build_classifier",
           "layer_decay_groups"]

MODES = ("knn", "linear", "finetune")


@dataclass
class EvalConfig:
    """Options of ``sparkmim evaluate``; each is a ``--flag`` of the same name."""

    mode: str = _opt("knn", "knn, linear or finetune")
    data: str = _opt("", "labelled image folder: one sub-folder per class")
    val: str | None = _opt(None, "validation folder with the same class sub-folders (default: a seeded split of --data)")
    val_fraction: float = _opt(0.2, "fraction of each class held out for validation when --val is not given")
    train_fraction: float = _opt(1.0, "fraction of each class of the training part that is used (few-label runs)")
    model: str = _opt("resnet50", "backbone: timm name, 'timm:NAME' or 'torchvision:NAME'")
    weights: str = _opt("random", "comma-separated weight sources, each 'random', 'pretrained' (timm/torchvision "
                                  "weights), or a sparkmim run folder / exported .safetensors / checkpoint; "
                                  "optionally named as NAME=SOURCE")
    in_chans: int = _opt(3, "image channels the backbone takes (1 for grayscale)")
    input_size: int = _opt(224, "image size in pixels")
    crop_ratio: float = _opt(0.875, "evaluation images are resized to input_size / crop_ratio, then centre-cropped")
    norm_stats: str = _opt("imagenet", "normalisation: 'imagenet' or 'data' (computed from the training images)")
    batch_size: int = _opt(64, "images per batch")
    workers: int = _opt(2, "data-loading worker processes")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    seed: int = _opt(0, "seed of the split, the random initialisation, the head and the data order")
    out: str = _opt("runs/eval", "run folder: results.json and the per-epoch history")
    progress: bool = _opt(True, "show progress bars")
    # k-NN
    k: str = _opt("20", "k-NN: comma-separated neighbour counts")
    temperature: float = _opt(0.07, "k-NN: temperature of the exp(similarity / T) vote weights")
    # linear probe and fine-tuning
    epochs: int = _opt(0, "training epochs (0: 100 for linear, 20 for finetune)")
    lr: float = _opt(0.0, "peak lr (0: 1e-3 for linear; finetune: base_lr x batch / 256)")
    base_lr: float = _opt(4e-3, "finetune: lr = base_lr x batch / 256 when --lr is 0")
    optimizer: str = _opt("adamw", "finetune: adamw or lamb")
    weight_decay: float = _opt(0.05, "finetune weight decay (linear probe: none)")
    warmup_epochs: float = _opt(2.0, "linear lr warm-up epochs, then cosine decay")
    label_smoothing: float = _opt(0.1, "finetune: label smoothing")
    layer_decay: float = _opt(0.7, "finetune: layer-wise lr decay (1: off)")
    mixup: float = _opt(0.0, "finetune: mixup alpha (0: off)")
    cutmix: float = _opt(0.0, "finetune: cutmix alpha (0: off)")
    drop_path: float = _opt(0.0, "finetune: stochastic depth rate (models that have it: timm drop_path_rate, "
                                 "torchvision stochastic_depth_prob)")
    clip_grad: float = _opt(0.0, "finetune: clip the global gradient norm to this value (0: off, as in the "
                                 "paper's fine-tuning recipes)")
    crop_scale_min: float = _opt(0.35, "finetune: RandomResizedCrop minimum area fraction")
    hflip: float = _opt(0.5, "finetune: horizontal-flip probability (0 for digits and text)")

    def __post_init__(self):
        errors = []
        if self.mode not in MODES:
            errors.append(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not 0 < self.val_fraction < 1:
            errors.append("val_fraction must be between 0 and 1")
        if not 0 < self.train_fraction <= 1:
            errors.append("train_fraction must be in (0, 1]")
        if not 0 < self.crop_ratio <= 1:
            errors.append("crop_ratio must be in (0, 1]")
        if self.norm_stats not in ("imagenet", "data"):
            errors.append("norm_stats must be 'imagenet' or 'data'")
        if self.optimizer not in ("adamw", "lamb"):
            errors.append("optimizer must be 'adamw' or 'lamb'")
        if not 0 <= self.drop_path < 1 or self.clip_grad < 0:
            errors.append("drop_path must be in [0, 1) and clip_grad >= 0")
        if self.batch_size < 1 or self.epochs < 0 or self.workers < 0:
            errors.append("batch_size must be >= 1, epochs and workers >= 0")
        try:
            ks = self.ks
            if not ks or min(ks) < 1:
                raise ValueError
        except ValueError:
            errors.append(f"k must be comma-separated positive integers, got '{self.k}'")
        if errors:
            raise ValueError("; ".join(errors))

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
            raise ValueError("--weights names no weight source")
        return out

    def train_epochs(self) -> int:
        return self.epochs or (100 if self.mode == "linear" else 20)

    @classmethod
    def options(cls):
        return [(f.name, f.type, f.default, f.metadata.get("help", "")) for f in fields(cls)]


def _short(source: str) -> str:
    if source in ("random", "pretrained"):
        return source
    p = Path(source)
    return p.parent.name if p.name in ("encoder.safetensors",) else p.stem if p.is_file() else p.name


# -- data ----------------------------------------------------------------------------------------
class LabelledImages(torch.utils.data.Dataset):
    """``(path, class index)`` samples with a transform; images are read with :func:`load_image`."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform, channels: int):
        self.samples, self.classes, self.transform, self.channels = samples, classes, transform, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(load_image(path, self.channels)), label

    @property
    def targets(self) -> Tensor:
        return torch.tensor([y for _, y in self.samples])


def scan_classes(root: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Images under ``root/<class>/`` (searched recursively inside each class folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"labelled data folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise ValueError(f"{root} must hold one sub-folder per class (at least 2), found {len(classes)}")
    elif set(found) - set(classes):
        raise ValueError(f"{root} has classes not in the training folder: {sorted(set(found) - set(classes))}")
    samples = []
    for i, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        samples += [(p, i) for p in files]
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return samples, classes


def split_samples(samples, fraction: float, seed: int):
    """A seeded, class-stratified split: ``(kept, held_out)`` with ``fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    kept, held = [], []
    for c in sorted(by_class):
        items = by_class[c]
        order = rng.permutation(len(items))
        n_held = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        held += [items[i] for i in order[:n_held]]
        kept += [items[i] for i in order[n_held:]]
    return kept, held


def _eval_transform(cfg: EvalConfig, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(cfg.input_size / cfg.crop_ratio), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(cfg.input_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def _train_transform(cfg: EvalConfig, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(cfg.input_size, scale=(cfg.crop_scale_min, 1.0),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def build_splits(cfg: EvalConfig):
    """``(train_samples, val_samples, classes)`` of the labelled data, split as configured."""
    samples, classes = scan_classes(cfg.data)
    if cfg.val:
        val, _ = scan_classes(cfg.val, classes)
        train = samples
    else:
        train, val = split_samples(samples, cfg.val_fraction, cfg.seed)
    if cfg.train_fraction < 1:
        _, train = split_samples(train, cfg.train_fraction, cfg.seed + 1)
    if not val:
        raise ValueError("the validation part is empty: give --val or more images per class")
    return train, val, classes


# -- weights -------------------------------------------------------------------------------------
def weights_state(source: str | Path) -> dict[str, Tensor]:
    """The backbone weights (original model keys) in a sparkmim run folder, an exported
    ``.safetensors``/``.pth`` file, or a pre-training checkpoint."""
    p = Path(source)
    if p.is_dir():
        if (p / "encoder.safetensors").is_file():
            p = p / "encoder.safetensors"
        else:
            ckpts = sorted(p.glob("checkpoint-*.pth"))
            if not ckpts:
                raise FileNotFoundError(f"{p} holds neither encoder.safetensors nor a checkpoint")
            p = ckpts[-1]
    if not p.is_file():
        raise FileNotFoundError(f"weights '{source}' not found (give 'random', 'pretrained' or a file/run folder)")
    if p.suffix == ".pth":
        state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a pre-training checkpoint
            prefix = "encoder.model."
            return {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    return read_weights(p)


def build_backbone(cfg: EvalConfig, source: str, seed: int) -> tuple[nn.Module, dict | None]:
    """The backbone (classifier removed) with the weights of ``source``; random init is seeded."""
    torch.manual_seed(seed)
    drop_path = cfg.drop_path if cfg.mode == "finetune" else None
    if source == "pretrained":
        import timm

        name = cfg.model
        if name.startswith("torchvision:") or (not name.startswith("timm:") and not timm.is_model(name)):
            return create_backbone(name, in_chans=cfg.in_chans, drop_path=drop_path, weights="DEFAULT"), None
        return create_backbone(name, in_chans=cfg.in_chans, drop_path=drop_path, pretrained=True), None
    backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=drop_path)
    if source == "random":
        return backbone, None
    report = load_encoder_weights(backbone, weights_state(source), strict=True)
    return backbone, {"matched": len(report["matched"])}


# -- k-NN and features ---------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder: SparseEncoder, loader, device, progress: bool, desc: str) -> tuple[Tensor, Tensor]:
    """Global average pool of the last feature map, for every image of ``loader`` (eval mode)."""
    from tqdm import tqdm

    encoder.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        f = encoder(x.to(device))[-1]
        feats.append(f.float().mean((2, 3)).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, ks: list[int],
                 temperature: float, num_classes: int, chunk: int = 1024) -> dict[int, float]:
    """Top-1 accuracy (%) of the weighted k-NN classifier: cosine similarity, votes exp(s / T)."""
    train_f = F.normalize(train_f.float(), dim=1)
    val_f = F.normalize(val_f.float(), dim=1)
    kmax = min(max(ks), train_f.shape[0])
    correct = dict.fromkeys(ks, 0)
    for i in range(0, val_f.shape[0], chunk):
        sim, idx = (val_f[i:i + chunk] @ train_f.T).topk(kmax, dim=1)
        neighbours = train_y[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(sim.shape[0], num_classes)
            votes.scatter_add_(1, neighbours[:, :kk], (sim[:, :kk] / temperature).exp())
            correct[k] += int((votes.argmax(1) == val_y[i:i + chunk]).sum())
    return {k: 100.0 * c / val_f.shape[0] for k, c in correct.items()}


# -- linear probe --------------------------------------------------------------------------------
def linear_probe(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, num_classes: int,
                 cfg: EvalConfig, seed: int, progress: bool) -> list[float]:
    """A BatchNorm (no affine) + Linear head trained on frozen features; val top-1 per epoch."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False), nn.Linear(train_f.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    epochs = cfg.train_epochs()
    bs = min(cfg.batch_size, train_f.shape[0])
    steps_per_epoch = max(1, train_f.shape[0] // bs)
    sched = Schedule(cfg.lr or 1e-3, epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                     warmup_start_ratio=0.0, final_lr_ratio=0.0, wd=0.0, wd_end=0.0)
    opt = torch.optim.AdamW(head.parameters(), lr=sched.lr(0), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history, step = [], 0
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        head.train()
        order = torch.randperm(train_f.shape[0], generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = sched.lr(step)
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            history.append(100.0 * float((head(val_f).argmax(1) == val_y).float().mean()))
    return history


# -- fine-tuning ---------------------------------------------------------------------------------
class PooledClassifier(nn.Module):
    """Global average pool of the last feature map, dropout, and a linear layer: the head for
    backbones without a timm classifier (torchvision and custom models)."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop: float = 0.0):
        super().__init__()
        self.encoder = SparseEncoder(backbone, check=False)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(self.encoder.channels[-1], num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.encoder(x)[-1].mean((2, 3))))


def build_classifier(backbone: nn.Module, num_classes: int) -> nn.Module:
    """The backbone with a new classification head: timm models get their own head back
    (``reset_classifier``, so the architecture is the original one); others a pooled linear head."""
    if hasattr(backbone, "reset_classifier") and hasattr(backbone, "forward_head"):
        backbone.reset_classifier(num_classes)
        head = backbone.get_classifier()
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=2e-5)
            nn.init.zeros_(head.bias)
        return backbone
    return PooledClassifier(backbone, num_classes)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with lr scale ``layer_decay ** (depth - layer)``: timm's layer grouping
    for timm models, otherwise the order of the top-level blocks (head last, scale 1). No weight
    decay on biases and norm parameters."""
    if hasattr(model, "group_matcher"):
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    root = model.encoder.model if isinstance(model, PooledClassifier) else model
    blocks = [n for n, _ in root.named_children()]
    depth = len(blocks) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.removeprefix("encoder.model.")
        layer = blocks.index(short.split(".")[0]) + 1 if short != name and short.split(".")[0] in blocks else depth
        decay = p.ndim > 1
        g = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                               "lr_scale": layer_decay ** (depth - layer)})
        g["params"].append(p)
    return list(groups.values())


def finetune(backbone: nn.Module, train_ds, val_ds, num_classes: int, cfg: EvalConfig, device, seed: int,
             progress: bool) -> list[float]:
    """Full fine-tuning; validation top-1 (%) after each epoch."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = build_classifier(backbone, num_classes).to(device)
    bs = min(cfg.batch_size, len(train_ds))
    if bs % 2 and (cfg.mixup > 0 or cfg.cutmix > 0):
        bs -= 1  # mixup pairs samples within a batch
    gen = torch.Generator().manual_seed(seed)
    loader_kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, generator=gen,
                                               worker_init_fn=_seed_worker, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size, **loader_kw)
    epochs = cfg.train_epochs()
    steps_per_epoch = len(train_loader)
    peak = cfg.lr or cfg.base_lr * bs / 256
    sched = Schedule(peak, epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                     warmup_start_ratio=0.0, final_lr_ratio=0.01, wd=cfg.weight_decay, wd_end=cfg.weight_decay)
    groups = layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.optimizer == "lamb":
        opt = lamb(groups, lr=peak)
    else:
        opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history, step = [], 0
    bar = tqdm(total=epochs * steps_per_epoch, desc="fine-tune", disable=not progress, leave=False)
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            for g in opt.param_groups:
                g["lr"] = sched.lr(step) * g.get("lr_scale", 1.0)
            loss = criterion(model(x), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss is {value} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{history[-1]:.1f}" if history else "-")
        history.append(_accuracy(model, val_loader, device))
        print(json.dumps({"event": "epoch", "epoch": len(history), "loss": round(value, 4), "top1": history[-1]}),
              flush=True)
    bar.close()
    return history


def _seed_worker(worker_id: int) -> None:
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@torch.no_grad()
def _accuracy(model: nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / total


# -- driver --------------------------------------------------------------------------------------
def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every weight source of ``cfg`` and write ``results.json`` in ``cfg.out``."""
    device = resolve_device(cfg.device)
    sources = cfg.sources
    train_samples, val_samples, classes = build_splits(cfg)
    train_paths = [p for p, _ in train_samples]
    if cfg.norm_stats == "data":
        mean, std = compute_stats(train_paths, cfg.in_chans)
    else:
        mean, std = default_stats(cfg.in_chans)
    eval_tf = _eval_transform(cfg, mean, std)
    make = partial(LabelledImages, classes=classes, channels=cfg.in_chans)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(cfg), "classes": classes, "train_images": len(train_samples),
               "val_images": len(val_samples), "norm": {"mean": mean, "std": std}, "results": []}
    print(json.dumps({"event": "start", "mode": cfg.mode, "model": cfg.model, "classes": len(classes),
                      "train_images": len(train_samples), "val_images": len(val_samples),
                      "sources": [label for label, _ in sources], "device": str(device)}), flush=True)
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    for label, source in sources:
        started = time.perf_counter()
        backbone, report = build_backbone(cfg, source, cfg.seed)
        row: dict = {"weights": label, "source": source}
        if report:
            row["keys_matched"] = report["matched"]
        if cfg.mode == "finetune":
            history = finetune(backbone, make(train_samples, transform=_train_transform(cfg, mean, std)),
                               make(val_samples, transform=eval_tf), len(classes), cfg, device, cfg.seed, cfg.progress)
            row.update(top1=history[-1], best_top1=max(history), top1_per_epoch=history)
        else:
            encoder = SparseEncoder(backbone, check=False).to(device)
            tr = torch.utils.data.DataLoader(make(train_samples, transform=eval_tf), **loader_kw)
            va = torch.utils.data.DataLoader(make(val_samples, transform=eval_tf), **loader_kw)
            train_f, train_y = extract_features(encoder, tr, device, cfg.progress, f"{label}: train features")
            val_f, val_y = extract_features(encoder, va, device, cfg.progress, f"{label}: val features")
            if cfg.mode == "knn":
                accs = knn_accuracy(train_f, train_y, val_f, val_y, cfg.ks, cfg.temperature, len(classes))
                row.update({f"top1_k{k}": a for k, a in accs.items()})
                row["top1"] = accs[cfg.ks[0]]
            else:
                history = linear_probe(train_f, train_y, val_f, val_y, len(classes), cfg, cfg.seed, cfg.progress)
                row.update(top1=history[-1], best_top1=max(history), top1_per_epoch=history)
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["results"].append(row)
        print(json.dumps({"event": "result", **{k: v for k, v in row.items() if k != "top1_per_epoch"}}), flush=True)
        _write_json(out / "results.json", results)
    print(format_table(results), flush=True)
    return results


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
    header = ["weights", *cols, "seconds"]
    lines = [[r["weights"], *(f"{r[c]:.2f}" for c in cols), f"{r['seconds']:.0f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    title = f"{mode} top-1 (%) on {results['val_images']} validation images, {results['config']['model']}"
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s
