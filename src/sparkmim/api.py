"""``sparkmim.pretrain(...)``: the command line's pre-training in one Python call."""

from __future__ import annotations

__all__ = ["pretrain", "preprocess"]


def pretrain(data: str | None = None, *, config: str | None = None, **options) -> dict:
    """Pre-train with SparK as ``sparkmim pretrain`` does and return the run's summary (the
    dictionary its last line prints).

    ``data`` is an image folder or a text file of paths (``"demo"``: the demo photographs); it may
    be left out when a recipe names it or the run is resumed (``resume="auto"``: the run in ``out``
    continues with its own settings). ``config`` is a built-in recipe name (``demo``, ``resnet50``,
    ``convnext_small``, ``one_gpu``) or a YAML file; ``options`` are the command's flags with
    underscores, e.g. ``model="resnet18", epochs=10, batch_size=64, out="runs/r18"``. They are
    checked as the command checks them (:class:`~sparkmim.config.ConfigError` says what is wrong)."""
    from .config import config_for_run, recipe_path
    from .train import pretrain as run

    return run(config_for_run(recipe_path(config), {"data": data, **options}))


def preprocess(data: str, out: str, *, in_chans: int | None = None, spacing: str | None = None,
               foreground_crop: bool = False, workers: int = 0, progress: bool = True) -> dict:
    """Read each volume of ``data`` (a folder of volumes, a text file of paths, or an nnU-Net raw
    dataset) once into a cache at ``out`` that ``pretrain(data=out, ...)`` reads by region, as
    ``sparkmim preprocess`` does: channels stacked (``in_chans``; default: an nnU-Net dataset's,
    else 1), cropped to the non-zero box (``foreground_crop``), resampled to ``spacing``
    (``"X,Y,Z"`` in mm, as the pretrain option), in ``workers`` processes. A rerun completes an
    interrupted build and rebuilds the entries whose sources or settings changed. Prints a start
    line; returns the summary (volumes built, reused, unreadable; size; seconds)."""
    import json
    import math
    import shutil
    import time
    import warnings
    from pathlib import Path
    from types import SimpleNamespace

    from .arrays import build_cache
    from .config import ConfigError, parse_spacing
    from .inputs import CACHE_MANIFEST, KINDS, data_input
    from .modality import VOLUMES
    from .volumes import read_nnunet_dataset, volume_shape

    started = time.perf_counter()
    source, out = data_input(str(data)), Path(out)
    if source.kind not in ("folder", "list", "nnunet-raw"):
        raise ConfigError(f"sparkmim preprocess reads a folder of volumes, a file list or an nnU-Net raw dataset; "
                          f"{data} is {KINDS[source.kind]}")
    if out.is_dir() and any(out.iterdir()) and not (out / CACHE_MANIFEST).is_file() and not (out / "volumes").is_dir():
        raise ConfigError(f"--out {out} holds files that are not a sparkmim cache: choose a new or empty folder")
    channels = in_chans or (len(read_nnunet_dataset(source.path)[1]) if source.kind == "nnunet-raw" else 1)
    target = parse_spacing(spacing)
    listing = SimpleNamespace(data=str(data), in_chans=channels, model="sparkmim preprocess (volumes)", demo_length=0,
                              max_bad_fraction=1.0)
    samples, missing = VOLUMES.raw_samples(listing, source)
    raw = 0
    for files, _ in samples:  # from the headers: the float32 size before compression
        try:
            raw += 4 * channels * math.prod(volume_shape(files[0], target))
        except Exception:  # unreadable: reported when it is read
            pass
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(json.dumps({"event": "preprocess", "data": str(source), "kind": source.kind, "volumes": len(samples),
                      "in_chans": channels, "spacing": spacing, "foreground_crop": bool(foreground_crop),
                      "uncompressed_mib": round(raw / 2**20), "free_mib": round(free / 2**20), "out": str(out)}),
          flush=True)
    if raw > free:
        warnings.warn(f"the cache may need up to {raw / 2**30:.1f} GiB (float32 before compression) and {out} has "
                      f"{free / 2**30:.1f} GiB free", stacklevel=2)
    settings = {"in_chans": channels, "spacing": list(target) if target else None, "foreground_crop": bool(foreground_crop)}
    manifest = build_cache(samples, out, settings, str(source), workers=workers, progress=progress, missing=missing)
    for bad in manifest["bad"]:
        warnings.warn(f"skipping unreadable volume {bad['path']} ({bad['reason']})", stacklevel=2)
    size = sum(f.stat().st_size for f in (out / "volumes").glob("*.b2nd"))
    return {"event": "done", "volumes": len(manifest["volumes"]), "built": manifest["built"],
            "reused": manifest["reused"], "bad": len(manifest["bad"]), "cache_mib": round(size / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1), "cache": str(out),
            "use": f"sparkmim pretrain --data {out} ..."}
