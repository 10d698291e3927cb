"""Pre-training loss curves of several runs in one plot (from each run's ``metrics.jsonl``).

    python experiments/loss_curves.py OUT.png NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def curve(run: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the step records of ``run/metrics.jsonl``."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def main(out: Path, specs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for spec in specs:
        name, _, path = spec.partition("=")
        steps, losses = curve(Path(path))
        ax.plot(steps, losses, label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
