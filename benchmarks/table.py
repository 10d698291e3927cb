"""Print the JSON lines of benchmarks/step.py and benchmarks/loader.py as Markdown tables.

    python benchmarks/table.py runs/gpu-bench/gpu.jsonl [more.jsonl ...]

Step rows show each variant's speed against the plain ``reference`` variant of the same
precision (``reference``, ``reference+bf16`` or ``reference+fp16``), same model and part,
from the same file, when present.
"""

from __future__ import annotations

import json
import sys


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.startswith("{")]
    return rows


def step_table(rows) -> str:
    out = ["| model | part | variant | ms/step | img/s | peak MB | vs reference |", "|---|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["part"], r["variant"]): r for r in rows}
    for r in rows:
        precision = [v for v in r["variant"].split("+")[1:] if v in ("bf16", "fp16")]
        ref = by_key.get((r["model"], r["part"], "+".join(["reference", *precision])))
        ratio = f"{ref['ms_median'] / r['ms_median']:.2f}x" if ref and ref is not r else ""
        mem = r.get("peak_mem_mb", r.get("peak_rss_mb", ""))
        out.append(f"| {r['model']} | {r['part']} | {r['variant']} | {r['ms_median']} | {r['img_per_s']} | {mem} | {ratio} |")
    return "\n".join(out)


def loader_table(rows) -> str:
    out = ["| method | workers | img/s (per worker for single-process methods) |", "|---|---|---|"]
    for r in rows:
        rate = r.get("img_per_s_per_worker", r.get("img_per_s"))
        out.append(f"| {r['method']} | {r.get('workers', 1)} | {rate} |")
    return "\n".join(out)


def main(paths):
    rows = load(paths)
    steps = [r for r in rows if r.get("bench") == "step"]
    loads = [r for r in rows if r.get("bench") == "loader"]
    if steps:
        print(step_table(steps))
    if loads:
        print()
        print(loader_table(loads))


if __name__ == "__main__":
    main(sys.argv[1:])
