"""Volume input throughput: pre-training samples per second per data-loading process, from raw
NIfTI files read and resampled at every sample, from sparkmim's cache, and from nnU-Net's
preprocessed layout; then a whole pre-training run fed by two workers. JSON lines.

    python benchmarks/volume_loader.py                         # 4 generated CTs of 512 x 512 x 300
    python benchmarks/volume_loader.py --shape 256,256,150 --volumes 2 --seconds 10

The generated CT is int16 NIfTI (.nii.gz) with 0.7 x 0.7 x 2.5 mm voxels: a body (an ellipse of
soft tissue with bone and air) in air, as a scanner writes it. Each method is timed on the same
volumes, one process, crops of ``--crop`` (the random scaled crop of 67-100 % of each axis,
resized, flipped, normalised: what pre-training draws):

    raw-grid        the .nii.gz read and decompressed whole for each sample, on its voxel grid
    raw-spacing     the same, cropped to the foreground and resampled to --target mm (MONAI)
    cache           sparkmim preprocess's cache (blosc2, zstd): only the crop's region is read
    nnunet          the same resampled volume in nnU-Net's layout, written by nnU-Net's own
                    nnUNetDatasetBlosc2.save_case (lz4hc, its chunking for the crop)

Then ``sparkmim pretrain --data CACHE --model MODEL --benchmark STEPS --workers 2`` reports
img/s and data_wait for a whole step (``--run-model``, ``--run-crop``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="512,512,300", help="voxels along i, j, k")
    p.add_argument("--zooms", default="0.7,0.7,2.5", help="voxel size (mm) along i, j, k")
    p.add_argument("--volumes", type=int, default=4)
    p.add_argument("--target", type=float, default=1.5, help="isotropic voxel size of raw-spacing and the cache (mm)")
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--seconds", type=float, default=20.0, help="time per method (at least 3 samples)")
    p.add_argument("--methods", default="raw-grid,raw-spacing,cache,nnunet")
    p.add_argument("--run-model", default="monai:resnet18")
    p.add_argument("--run-crop", type=int, default=96)
    p.add_argument("--run-steps", type=int, default=12)
    p.add_argument("--run-workers", type=int, default=2)
    p.add_argument("--run-batch", type=int, default=2)
    p.add_argument("--run-device", default="auto")
    p.add_argument("--workdir", help="keep the generated files here (default: a temporary folder)")
    return p.parse_args(argv)


def make_ct(path: Path, shape, zooms, seed: int) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((i - cx) / (0.42 * shape[0])) ** 2 + ((j - cy) / (0.32 * shape[1])) ** 2 <= 1
    bone = ((i - cx) / (0.06 * shape[0])) ** 2 + ((j - cy * 1.3) / (0.06 * shape[1])) ** 2 <= 1
    ct = np.full(shape, -1000, np.int16)
    body = np.broadcast_to(body, shape)
    ct[body] = (40 + rng.normal(0, 30, size=int(body.sum()))).astype(np.int16)
    ct[np.broadcast_to(bone, shape)] = 700
    ct[:, :, : shape[2] // 10] = -1000  # air above and below the body
    nib.save(nib.Nifti1Image(ct, np.diag([*zooms, 1.0])), str(path))


def rate(dataset, seconds: float) -> dict:
    """Samples per second of ``dataset`` read in order, one process (at least 3 samples)."""
    n, started = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - started < seconds:
        sample, problem, _ = dataset[(0, n // len(dataset), n % len(dataset))]
        assert problem is None, problem
        n += 1
    elapsed = time.perf_counter() - started
    return {"samples": n, "seconds": round(elapsed, 2), "samples_per_s": round(n / elapsed, 3),
            "s_per_sample": round(elapsed / n, 4)}


def nnunet_layout(cache: Path, out: Path, crop: int) -> list:
    """The cache's volumes written in nnU-Net's layout by nnU-Net's own writer (its chunking for a
    ``crop``^3 patch)."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from sparkmim.arrays import StoredVolume

    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((cache / "sparkmim-cache.json").read_text())
    volumes = []
    for n, entry in enumerate(manifest["volumes"]):
        data = blosc2.open(str(cache / entry["array"]), mode="r")[:]
        blocks, chunks = comp_blosc2_params(data.shape, (crop,) * 3, data.itemsize)
        name = out / f"case{n:03d}"
        nnUNetDatasetBlosc2.save_case(data, np.zeros((1, *data.shape[1:]), np.int16), {}, str(name),
                                      chunks=chunks, blocks=blocks)
        volumes.append(StoredVolume(Path(f"{name}.b2nd"), name.name))
    return volumes


def main(argv=None) -> list[dict]:
    args = parse(argv)
    from sparkmim.arrays import ArrayVolumes, build_cache
    from sparkmim.volumes import VolumeFiles, volume_transform

    shape = tuple(int(v) for v in args.shape.split(","))
    zooms = tuple(float(v) for v in args.zooms.split(","))
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    (work / "ct").mkdir(parents=True, exist_ok=True)
    paths = [work / "ct" / f"ct{n}.nii.gz" for n in range(args.volumes)]
    for n, path in enumerate(paths):
        if not path.is_file():
            make_ct(path, shape, zooms, n)
    results = []

    def emit(record: dict) -> None:
        results.append(record)
        print(json.dumps(record), flush=True)

    emit({"event": "data", "volumes": len(paths), "shape_ijk": shape, "zooms_mm": zooms,
          "file_mib": round(paths[0].stat().st_size / 2**20, 1), "crop": args.crop, "target_mm": args.target})
    crop = (args.crop,) * 3
    target = (args.target,) * 3
    samples = [((p,), None) for p in paths]
    cache = work / "cache"
    methods = args.methods.split(",")
    if "raw-grid" in methods:
        emit({"method": "raw-grid", **rate(VolumeFiles(samples, volume_transform(crop, "window:-1000:400")),
                                           args.seconds)})
    if "raw-spacing" in methods:
        data = VolumeFiles(samples, volume_transform(crop, "window:-1000:400"), spacing=target, foreground=True)
        emit({"method": "raw-spacing", **rate(data, args.seconds)})
    if "cache" in methods or "nnunet" in methods:
        started = time.perf_counter()
        manifest = build_cache(samples, cache, {"in_chans": 1, "spacing": list(target), "foreground_crop": True},
                               str(work / "ct"), workers=0, progress=False)
        size = sum(f.stat().st_size for f in (cache / "volumes").glob("*.b2nd"))
        emit({"method": "cache-build", "volumes": len(manifest["volumes"]), "seconds": round(time.perf_counter() - started, 1),
              "shape": manifest["volumes"][0]["shape"], "cache_mib": round(size / 2**20, 1)})
    if "cache" in methods:
        from sparkmim.arrays import read_cache

        class Options:  # the run's options as the cache is checked against them
            in_chans, spacing, foreground_crop = 1, None, False

        volumes, _, _ = read_cache(cache, Options)
        emit({"method": "cache", **rate(ArrayVolumes(volumes, volume_transform(crop, "window:-1000:400")),
                                        args.seconds)})
    if "nnunet" in methods:
        volumes = nnunet_layout(cache, work / "nnunet", args.crop)
        emit({"method": "nnunet", **rate(ArrayVolumes(volumes, volume_transform(crop, None)), args.seconds)})
    if args.run_steps:
        done = subprocess.run([sys.executable, "-m", "sparkmim", "pretrain", "--data", str(cache), "--model",
                               args.run_model, "--input-size", str(args.run_crop), "--batch-size", str(args.run_batch),
                               "--workers", str(args.run_workers), "--device", args.run_device,
                               "--intensity", "window:-1000:400", "--epochs", "1000", "--benchmark", str(args.run_steps),
                               "--progress", "false", "--out", str(work / "run")], capture_output=True, text=True)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        bench = next((line for line in lines if line.get("event") == "benchmark"), None)
        emit({"method": f"pretrain {args.run_model} {args.run_crop}^3 on the cache, {args.run_workers} workers",
              **(bench or {"error": done.stderr[-500:]})})
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
