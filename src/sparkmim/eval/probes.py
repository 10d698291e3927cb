"""Frozen-feature evaluations: pooled features, the weighted k-NN classifier, the linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoder import SparseEncoder
from ..optim import Schedule
from .config import EvalConfig

__all__ = ["extract_features", "knn_accuracy", "linear_probe"]


@torch.no_grad()
def extract_features(encoder: SparseEncoder, loader, device, progress: bool, desc: str) -> tuple[list[Tensor], Tensor]:
    """Global average pools of every feature map (2-D or 3-D; finest first), for every image of
    ``loader`` (eval mode), and the labels."""
    from tqdm import tqdm

    encoder.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        feats.append([f.float().flatten(2).mean(2).cpu() for f in encoder(x.to(device))])
        labels.append(y)
    return [torch.cat(stage) for stage in zip(*feats)], torch.cat(labels)


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


def linear_probe(train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, num_classes: int,
                 cfg: EvalConfig, seed: int, progress: bool) -> list[float]:
    """A BatchNorm (no affine) + Linear head trained on frozen features; val top-1 per epoch."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False), nn.Linear(train_f.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    epochs = cfg.train_epochs()
    bs = min(cfg.batch(), train_f.shape[0])
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
