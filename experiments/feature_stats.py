"""How the pooled features of each stage spread, for several weight sources: effective rank, the
share of variance on the first principal component, and the ratio of between-class to
within-class variance (what k-NN on cosine similarity feels).

    python experiments/feature_stats.py data/shapes3d random runs/shapes3d/base_s0 ...

(``monai:resnet10``, one channel, 32^3 volumes; every second training volume of ``DATA/train``.)
"""

from __future__ import annotations

import json
import sys

import torch

from sparkmim.encoder import SparseEncoder
from sparkmim.eval.config import EvalConfig
from sparkmim.eval.data import LabelledSamples, build_splits
from sparkmim.eval.probes import extract_features
from sparkmim.eval.run import build_backbone
from sparkmim.modality import VOLUMES
from sparkmim.volumes import volume_eval_transform


def spread(f: torch.Tensor, y: torch.Tensor, classes: int) -> dict:
    f = f.double()
    power = torch.linalg.svdvals(f - f.mean(0)) ** 2
    p = power / power.sum()
    means = torch.stack([f[y == k].mean(0) for k in range(classes)])
    between = ((means - f.mean(0)) ** 2).sum(1).mean()
    within = torch.stack([((f[y == k] - means[k]) ** 2).sum(1).mean() for k in range(classes)]).mean()
    return {"effective_rank": round(float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())), 1),
            "top_pc_share": round(float(p[0]), 3), "between_within": round(float(between / within), 3)}


def main(data: str, sources: list[str]) -> None:
    cfg = EvalConfig(mode="knn", data=f"{data}/train", val=f"{data}/val", model="monai:resnet10", in_chans=1,
                     input_size=32, input_depth=32, workers=1, progress=False)
    train, _, classes = build_splits(cfg, VOLUMES)
    images = LabelledSamples(train[::2], classes, volume_eval_transform((32, 32, 32), "zscore"), 1, VOLUMES)
    loader = torch.utils.data.DataLoader(images, batch_size=50)
    for source in sources:
        backbone, _ = build_backbone(cfg, source, 0)
        feats, y = extract_features(SparseEncoder(backbone, None, in_chans=1, check=False), loader,
                                    torch.device("cpu"), False, "")
        for stage, f in enumerate(feats, 1):
            print(json.dumps({"weights": source, "stage": stage, **spread(f, y, len(classes))}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
