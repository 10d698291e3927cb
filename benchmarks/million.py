"""Start-up on a million images: listing a folder, indexing tar shards, and the time from the
command to the first training step. JSON lines.

    python benchmarks/million.py --count 1000000 --workdir /tmp/million      # writes ~1M files once
    python benchmarks/million.py --count 100000 --rglob                     # also the old listing

Generated data: ``--count`` tiny PNGs (16 x 16, a few hundred bytes each) in ``--folders``
folders, and the same images in tar shards of 10,000 (WebDataset style, KEY.png and KEY.cls).
Measured, each in a fresh process where it says so:

    list-scandir    sparkmim.inputs.walk_files on the folder (what pre-training does)
    list-rglob      Path.rglob with an is_file() per path (what sparkmim did before; --rglob)
    index-shards    sparkmim.shards.index_shards (tar headers only)
    first-step      `sparkmim pretrain --data D --benchmark 1` (ResNet-10t at 64 px, batch 8): the
                    wall time from the command to the end of its first step, folder and shards

The files stay in --workdir for later runs (generating a million takes minutes). The page cache
is warm after generation; a cold start on network storage lists slower.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--folders", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--workdir", default="/tmp/sparkmim-million")
    p.add_argument("--rglob", action="store_true", help="also time the rglob listing")
    return p.parse_args(argv)


def generate(root: Path, count: int, folders: int, per_shard: int) -> dict:
    """The images (a few distinct tiny PNGs under many names) and their shards, written once."""
    from PIL import Image

    folder, shards = root / "images", root / "shards"
    done = root / f"done-{count}"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    shards.mkdir(parents=True, exist_ok=True)
    tar = None
    for n in range(count):
        sub = folder / f"{n % folders:05d}"
        if n < folders:
            sub.mkdir(parents=True, exist_ok=True)
        data = blobs[n % len(blobs)]
        (sub / f"{n:08d}.png").write_bytes(data)
        if n % per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(shards / f"shards-{n // per_shard:06d}.tar", "w")
        for name, payload in ((f"{n:08d}.png", data), (f"{n:08d}.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    last = (count - 1) // per_shard
    record = {"event": "generated", "count": count, "folders": folders, "shards": last + 1,
              "shard_spec": str(shards / f"shards-{{000000..{last:06d}}}.tar"), "seconds": round(time.perf_counter() - started)}
    done.write_text(json.dumps(record))
    return record


def timed(code: str) -> dict:
    """A Python snippet in a fresh process; it prints a JSON line."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    return {**line, "process_s": round(time.perf_counter() - started, 2)}


def first_step(data: str, out: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sparkmim", "pretrain", "--data", data, "--model", "resnet10t",
                           "--input-size", "64", "--batch-size", "8", "--decoder-width", "32", "--workers", "0",
                           "--epochs", "1", "--benchmark", "1", "--progress", "false", "--out", str(out)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    start = next((json.loads(line) for line in done.stdout.splitlines() if '"event": "start"' in line), {})
    return {"to_first_step_s": round(seconds, 1), "images": start.get("images"),
            **({} if done.returncode == 0 else {"error": done.stderr[-500:]})}


def main(argv=None) -> list[dict]:
    args = parse(argv)
    root = Path(args.workdir)
    results = []

    def emit(record: dict) -> None:
        results.append(record)
        print(json.dumps(record), flush=True)

    made = generate(root, args.count, args.folders, args.per_shard)
    emit(made)
    folder = root / "images"
    emit({"method": "list-scandir", **timed(
        "import json, time\nfrom sparkmim.data import is_image_name\nfrom sparkmim.inputs import walk_files\n"
        f"t = time.perf_counter(); n = len(walk_files({str(folder)!r}, is_image_name))\n"
        "print(json.dumps({'files': n, 'seconds': round(time.perf_counter() - t, 2)}))")})
    if args.rglob:
        emit({"method": "list-rglob", **timed(
            "import json, time\nfrom pathlib import Path\n"
            f"t = time.perf_counter(); n = len(sorted(p for p in Path({str(folder)!r}).rglob('*') "
            "if p.suffix.lower() == '.png' and p.is_file()))\n"
            "print(json.dumps({'files': n, 'seconds': round(time.perf_counter() - t, 2)}))")})
    emit({"method": "index-shards", **timed(
        "import json, time\nfrom sparkmim.inputs import expand_shards\nfrom sparkmim.shards import index_shards\n"
        f"t = time.perf_counter(); n = len(index_shards(expand_shards({made['shard_spec']!r})))\n"
        "print(json.dumps({'images': n, 'seconds': round(time.perf_counter() - t, 2)}))")})
    emit({"method": "first-step folder", **first_step(str(folder), root / "run")})
    emit({"method": "first-step shards", **first_step(made["shard_spec"], root / "run")})
    return results


if __name__ == "__main__":
    main()
