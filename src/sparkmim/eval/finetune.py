"""Full fine-tuning: a classification head, layer-wise lr decay, and the training loop."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch import Tensor, nn

from ..backbones import feature_modules_for
from ..encoder import SparseEncoder
from ..optim import Schedule, clip_grad_norm_, lamb
from ..weights import ENCODER_PREFIX
from .config import EvalConfig

__all__ = ["PooledClassifier", "build_classifier", "layer_decay_groups", "finetune"]


class PooledClassifier(nn.Module):
    """Global average pool of the last feature map, dropout, and a linear layer: the head for
    backbones without a timm classifier (torchvision and custom models)."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop: float = 0.0, feature_modules=None):
        super().__init__()
        self.encoder = SparseEncoder(backbone, feature_modules, check=False)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(self.encoder.channels[-1], num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.encoder(x)[-1].flatten(2).mean(2)))  # pooled over 2 or 3 spatial dims


def build_classifier(backbone: nn.Module, num_classes: int, feature_modules=None) -> nn.Module:
    """The backbone with a new classification head: timm models get their own head back
    (``reset_classifier``, so the architecture is the original one); others a pooled linear head
    (on the last of ``feature_modules`` when given, e.g. a UNet's encoder)."""
    if hasattr(backbone, "reset_classifier") and hasattr(backbone, "forward_head"):
        backbone.reset_classifier(num_classes)
        head = backbone.get_classifier()
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=2e-5)
            nn.init.zeros_(head.bias)
        return backbone
    return PooledClassifier(backbone, num_classes, feature_modules=feature_modules)


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
        short = name.removeprefix(ENCODER_PREFIX)  # a PooledClassifier holds the backbone as SparK does
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
    np.random.seed(seed % 2**32)  # timm's mixup draws from numpy (worker processes seed theirs: _seed_worker)
    model = build_classifier(backbone, num_classes, feature_modules_for(cfg.model)).to(device)
    bs = min(cfg.batch(), len(train_ds))
    if bs % 2 and (cfg.mixup > 0 or cfg.cutmix > 0):
        bs -= 1  # mixup pairs samples within a batch
    gen = torch.Generator().manual_seed(seed)
    loader_kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True, generator=gen,
                                               worker_init_fn=_seed_worker, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch(), **loader_kw)
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
            value = optimizer_step(model, opt, criterion(model(x), y), step, "fine-tuning", cfg.clip_grad)
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{history[-1]:.1f}" if history else "-")
        history.append(_accuracy(model, val_loader, device))
        print(json.dumps({"event": "epoch", "epoch": len(history), "loss": round(value, 4), "top1": history[-1]}),
              flush=True)
    bar.close()
    return history


def optimizer_step(model: nn.Module, opt, loss: Tensor, step: int, what: str, clip: float = 0.0) -> float:
    """One optimiser step on ``loss`` (its gradient norm clipped to ``clip`` when above 0); the
    loss's value. ``FloatingPointError`` for a loss that is not finite, before any update."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} loss is {value} at step {step}; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return value


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
