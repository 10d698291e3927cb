"""Summarise experiments/mnist.sh: mean and spread over seeds of every evaluation, as Markdown.

    python experiments/summarise.py runs/mnist
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

METRICS = [("knn", "top1_k20", "k-NN (k=20)"), ("knn", "top1_k10", "k-NN (k=10)"),
           ("linear", "top1", "linear probe"), ("finetune", "top1", "fine-tune, 1,000 labels")]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def main(root: Path) -> None:
    table: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    for res in sorted(root.glob("eval/*/*/results.json")):
        mode = res.parent.name
        for row in json.loads(res.read_text())["results"]:
            for m, key, title in METRICS:
                if m == mode and key in row:
                    table.setdefault(row["weights"], {}).setdefault(title, []).append(row[key])
            seconds.setdefault(f"{mode}", []).append(row["seconds"])
    titles = [t for _, _, t in METRICS]
    print("| weights | " + " | ".join(titles) + " |")
    print("|---|" + "---|" * len(titles))
    for weights, cols in table.items():
        cells = []
        for t in titles:
            vals = cols.get(t, [])
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.1f} (1 seed)")
            else:
                m, s = mean_std(vals)
                cells.append(f"{m:.1f} ± {s:.1f} ({len(vals)} seeds: {', '.join(f'{v:.1f}' for v in vals)})")
        print(f"| {weights} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mnist"))
