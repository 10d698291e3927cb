"""Tables of a per-stage evaluation (``sparkmim evaluate knn|linear --stage all``), as Markdown:
one row per weight source, k-NN and linear-probe top-1 for each stage.

    python experiments/summarise_stages.py runs/shapes3d/eval/base runs/shapes3d/eval/fine ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_of(folder: Path) -> dict[str, dict[str, float]]:
    """{weights: {"knn s1": top-1, ..., "linear s4": top-1}} from ``folder/{knn,linear}/results.json``."""
    table: dict[str, dict[str, float]] = {}
    for mode in ("knn", "linear"):
        path = folder / mode / "results.json"
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["results"]:
            table.setdefault(row["weights"], {})[f"{mode} s{row.get('stage', 'last')}"] = row["top1"]
    return table


def main(folders: list[Path]) -> None:
    merged: dict[str, dict[str, float]] = {}
    for folder in folders:
        for weights, cells in rows_of(folder).items():
            merged.setdefault(weights if weights not in merged or folder == folders[0] else f"{weights} ({folder.name})",
                              {}).update(cells)
    columns = sorted({c for cells in merged.values() for c in cells}, key=lambda c: (c.split()[0] != "knn", c))
    print("| weights | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for weights, cells in merged.items():
        print(f"| {weights} | " + " | ".join(f"{cells[c]:.1f}" if c in cells else "-" for c in columns) + " |")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
