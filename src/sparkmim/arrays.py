"""Volumes stored as arrays and read by region: sparkmim's volume cache and nnU-Net's
preprocessed data.

**The cache** (``sparkmim preprocess DATA --out CACHE``, then ``--data CACHE``) holds each volume
as :func:`~sparkmim.volumes.read_sample` gives it to pre-training (channels stacked, cropped to
its foreground and resampled to ``--spacing`` when asked), read once, as a chunked compressed
array (blosc2's ``.b2nd``, the format nnU-Net stores its preprocessed data in, so one library reads
both), with a JSON entry beside it (its source files with their size and modification time, the
settings, shape, voxel size and intensity statistics) and a manifest, ``sparkmim-cache.json``. The
build runs in parallel, writes every file atomically (a killed build loses only the volumes in
progress; a rerun completes it), reuses an entry only when its sources and settings are
unchanged, and lists unreadable files as pre-training does. A run on the cache refuses one whose
sources changed since it was built.

**nnU-Net's preprocessed data** (``$nnUNet_preprocessed/DatasetXXX``) holds each case resampled
and normalised by nnU-Net, as ``CASE.b2nd`` (nnU-Net 2.5 and later), ``CASE.npy`` or
``CASE.npz``, in the folder of a plans configuration (its ``data_identifier``), with the axes in
the plans' ``transpose_forward`` order. The ``.pkl`` files beside them are pickles and are never
opened; what is needed comes from the plans and ``dataset.json``.

Pre-training reads a crop as from the raw files (:class:`ArrayVolumes`): the same MONAI
transform, seeded the same way, draws the random scaled crop from the array's shape alone, only
that region is read (and decompressed), then resized, flipped and normalised. So a sample is the
one the raw files give, at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .data import DataError, ImageFiles, _reason
from .inputs import CACHE_MANIFEST, nnunet_plans_in
from .masking import seed_for

__all__ = ["StoredVolume", "ArrayVolumes", "open_array", "read_region", "build_cache", "read_cache",
           "nnunet_preprocessed_volumes", "CACHE_FORMAT", "volume_stats"]

CACHE_FORMAT = 1
_CHUNKS, _BLOCKS = 64, 16  # cache arrays: chunks of 64^3 voxels (a region read decompresses only the chunks it meets)


@dataclass(frozen=True)
class StoredVolume:
    """One volume stored as an array: its file (``.b2nd``, ``.npy`` or ``.npz``), the name shown for
    it, and ``order``, where its array axes are permuted (nnU-Net's ``transpose_forward``: array
    axis ``j`` holds volume axis ``order[j]``; None: in order)."""

    path: Path
    name: str
    order: tuple[int, ...] | None = None


def open_array(path: Path):
    """A ``(C, ...)`` array readable by region: a blosc2 NDArray opened memory-mapped, an ``.npy``
    memory map, or (``.npz``, nnU-Net before 2.5) the ``data`` array read whole."""
    name = path.name
    if name.endswith(".b2nd"):
        import blosc2

        return blosc2.open(str(path), mode="r", mmap_mode="r")
    if name.endswith(".npy"):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return f["data"]
    raise ValueError(f"not an array file (.b2nd, .npy, .npz): {name}")


def _volume_axes(volume: StoredVolume, ndim: int) -> tuple[int, ...]:
    """The permutation of a stored array's axes into ``(C, D, H, W)``."""
    order = volume.order or tuple(range(ndim - 1))
    return (0, *[1 + order.index(axis) for axis in range(ndim - 1)])


def stored_shape(volume: StoredVolume, array) -> tuple[int, ...]:
    """The ``(C, D, H, W)`` shape of a stored volume."""
    shape = tuple(array.shape)
    return tuple(shape[a] for a in _volume_axes(volume, len(shape)))


def read_region(volume: StoredVolume, array, region: tuple[slice, ...]) -> np.ndarray:
    """The voxels of ``region`` (slices along ``D, H, W``) of a stored volume, all channels, as
    float32 ``(C, d, h, w)``; only that region is read from the file."""
    axes = _volume_axes(volume, len(array.shape))  # volume axis v is stored axis axes[v]
    stored = [slice(None)] * len(axes)
    for v in range(1, len(axes)):
        stored[axes[v]] = region[v - 1]
    part = np.asarray(array[tuple(stored)], dtype=np.float32)
    return np.ascontiguousarray(part.transpose(axes))


class ArrayVolumes(ImageFiles):
    """Augmented crops of stored volumes (:class:`StoredVolume`), read by region: ``transform`` is
    the pre-training transform of :func:`~sparkmim.volumes.volume_transform`, whose first step,
    the random scaled crop, is drawn from the array's shape; only that region is read, then the
    other steps run. Keys, unreadable files and batches as in :class:`~sparkmim.data.ImageFiles`."""

    kind = "volume"

    def __init__(self, volumes: list[StoredVolume], transform, channels: int = 1, max_skips: int = 64):
        from monai.transforms import Compose

        super().__init__([v.path for v in volumes], transform, channels, max_skips)
        self.volumes = volumes
        self.crop = transform.transforms[0]
        self.rest = Compose(transform.transforms[1:])  # the same transform objects: seeded with the whole

    def name_of(self, index: int) -> str:
        return self.volumes[index].name

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (0, 0, key)
        seed, epoch, index = key
        volume = self.volumes[index]
        try:
            region = self._crop(volume, seed_for(seed, epoch, index))
        except Exception as e:  # corrupt, truncated, vanished: reported, never a crash
            return None, (str(volume.path), _reason(e)), key
        return self.rest(region), None, key

    def _crop(self, volume: StoredVolume, seed: int) -> np.ndarray:
        """The random scaled crop of ``volume`` for ``seed``, as the whole transform on the whole
        volume would draw it, read from the file."""
        array = open_array(volume.path)
        shape = stored_shape(volume, array)
        if shape[0] != self.channels:
            raise ValueError(f"{shape[0]} channel(s) of shape {tuple(shape[1:])}, the run reads {self.channels}")
        self.transform.set_random_state(seed=seed % (2**32))
        self.crop.randomize(shape[1:])
        return read_region(volume, array, tuple(self.crop._slices))


# -- nnU-Net's preprocessed data ------------------------------------------------------------------

def nnunet_preprocessed_volumes(folder: Path, model: str) -> tuple[list[StoredVolume], list[str], dict]:
    """The cases of an nnU-Net preprocessed dataset folder, the channel names of its
    ``dataset.json``, and what was read (plans, configuration, data folder). The plans are those of
    ``--model nnunet:PLANS.json[:CONFIGURATION]`` when it names a plans file, else the folder's
    only plans file (or ``nnUNetPlans.json``) with ``3d_fullres``."""
    from .nnunet import _split, read_plans

    plans_path, configuration = None, "3d_fullres"
    if model.startswith("nnunet:"):
        _, plans_path, configuration = _split(model.removeprefix("nnunet:"))
    if plans_path is None:
        found = nnunet_plans_in(folder)
        default = [p for p in found if p.name == "nnUNetPlans.json"]
        if len(found) > 1 and not default:
            raise DataError(f"{folder} holds several nnU-Net plans ({', '.join(p.name for p in found)}): name the "
                            f"one to read with --model nnunet:{folder}/PLANS.json")
        plans_path = (default or found)[0]
    plans = json.loads(Path(plans_path).read_text())
    identifier = read_plans(plans_path, configuration).get("data_identifier")
    data = folder / str(identifier)
    if not data.is_dir():
        raise DataError(f"{folder} has no folder {identifier} for configuration {configuration} of {plans_path}: run "
                        f"nnUNetv2_preprocess for it, or name another configuration (--model nnunet:PLANS.json:CONF)")
    order = tuple(plans.get("transpose_forward", (0, 1, 2)))
    names = sorted(os.listdir(data))
    volumes = []
    for ending in (".b2nd", ".npy", ".npz"):  # nnU-Net 2.5 and later; unpacked and packed before
        cases = [n[: -len(ending)] for n in names if n.endswith(ending) and not n.endswith("_seg" + ending)]
        if cases:
            volumes = [StoredVolume(data / (c + ending), c, order) for c in cases]
            break
    if not volumes:
        raise DataError(f"no preprocessed cases (CASE.b2nd, .npy or .npz) in {data}")
    meta = json.loads((folder / "dataset.json").read_text())
    channels = meta.get("channel_names", meta.get("modality", {}))
    names = [channels[k] for k in sorted(channels, key=int)]
    return volumes, names, {"plans": str(plans_path), "configuration": configuration, "folder": str(data)}


# -- sparkmim's cache -------------------------------------------------------------------------------

def volume_stats(volume: np.ndarray) -> list[dict]:
    """Per channel: mean, std, 0.5 and 99.5 percentiles over all voxels and over the non-zero ones
    (the foreground of a foreground-cropped volume), as nnU-Net's normalisations use them."""
    out = []
    for channel in volume:
        nonzero = channel[channel != 0]
        entry = {}
        for name, values in (("all", channel), ("nonzero", nonzero)):
            if values.size:
                low, high = np.percentile(values, [0.5, 99.5])
                entry[name] = {"mean": float(values.mean()), "std": float(values.std()), "p00_5": float(low),
                               "p99_5": float(high)}
        out.append(entry)
    return out


def _sources(files: tuple[Path, ...]) -> list[dict]:
    return [{"path": str(Path(f).resolve()), "size": os.stat(f).st_size, "mtime_ns": os.stat(f).st_mtime_ns}
            for f in files]


def _entry_id(files: tuple[Path, ...], index: int | None) -> str:
    text = "|".join(str(Path(f).resolve()) for f in files) + f"#{index}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _write_json(path: Path, data) -> None:
    from .weights import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _build_one(job: tuple) -> tuple[str, object]:
    """One cache entry: ``("reused" | "built", entry)``, or ``("bad", (path, reason))``."""
    from .volumes import read_sample, voxel_spacing

    files, index, settings, out = job
    files = tuple(Path(f) for f in files)
    ident = _entry_id(files, index)
    array_path, entry_path = out / "volumes" / f"{ident}.b2nd", out / "volumes" / f"{ident}.json"
    try:
        sources = _sources(files)
        if entry_path.is_file() and array_path.is_file():
            entry = json.loads(entry_path.read_text())
            if entry.get("sources") == sources and entry.get("settings") == settings:
                return "reused", entry
        volume = read_sample(files, settings["in_chans"], index, settings["spacing"] and tuple(settings["spacing"]),
                             settings["foreground_crop"])
        spacing = settings["spacing"]
        if spacing is None and files[0].name.lower().endswith((".nii", ".nii.gz")):
            spacing = list(voxel_spacing(files[0]))
        _write_array(volume, array_path)
    except Exception as e:  # unreadable, NaN voxels, another channel count: listed, never a crash
        return "bad", (str(files[0]), _reason(e))
    entry = {"array": f"volumes/{ident}.b2nd", "name": files[0].name + ("" if index is None else f" [{index}]"),
             "sources": sources, "series_index": index, "settings": settings, "shape": list(volume.shape),
             "spacing": spacing, "stats": volume_stats(volume)}
    _write_json(entry_path, entry)  # after the array: an entry always has its array
    return "built", entry


def _write_array(volume: np.ndarray, path: Path) -> None:
    import blosc2

    tmp = path.with_name(path.name + ".tmp")
    chunks = (volume.shape[0], *(min(_CHUNKS, n) for n in volume.shape[1:]))
    blocks = (volume.shape[0], *(min(_BLOCKS, n) for n in volume.shape[1:]))
    blosc2.asarray(np.ascontiguousarray(volume, dtype=np.float32), urlpath=str(tmp), mode="w", chunks=chunks,
                   blocks=blocks, cparams={"codec": blosc2.Codec.ZSTD, "clevel": 5})
    os.replace(tmp, path)


def build_cache(samples: list[tuple[tuple[Path, ...], int | None]], out: Path, settings: dict, source: str,
                workers: int = 0, progress: bool = True, missing: dict | None = None) -> dict:
    """Write (or complete) the cache of ``samples`` (``(files, series index)``, as
    :func:`~sparkmim.volumes.read_sample` reads them) in ``out`` with ``settings`` (``in_chans``,
    ``spacing`` along ``D, H, W`` or None, ``foreground_crop``); ``workers`` processes (0: this
    one). Entries whose sources and settings are unchanged are kept; the manifest lists the
    volumes in ``samples``' order and the files that could not be read. Returns the manifest."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    (out / "volumes").mkdir(exist_ok=True)
    jobs = [(tuple(str(f) for f in files), index, settings, out) for files, index in samples]
    done: dict[int, tuple[str, object]] = {}
    bar = tqdm(total=len(jobs), desc="preprocess", unit="volume", disable=not progress, dynamic_ncols=True)
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {pool.submit(_build_one, job): i for i, job in enumerate(jobs)}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                done[futures[future]] = future.result()
                bar.update()
    else:
        for i, job in enumerate(jobs):
            done[i] = _build_one(job)
            bar.update()
    bar.close()
    volumes = [done[i][1] for i in range(len(jobs)) if done[i][0] != "bad"]
    bad = {**(missing or {}), **dict(done[i][1] for i in range(len(jobs)) if done[i][0] == "bad")}
    kept = {Path(e["array"]).stem for e in volumes}
    for stale in (out / "volumes").iterdir():  # entries of sources no longer listed, and partial writes
        if stale.name.split(".")[0] not in kept:
            stale.unlink(missing_ok=True)
    manifest = {"format": CACHE_FORMAT, "source": source, "settings": settings, "volumes": volumes,
                "bad": [{"path": p, "reason": r} for p, r in bad.items()],
                "built": sum(done[i][0] == "built" for i in done), "reused": sum(done[i][0] == "reused" for i in done)}
    _write_json(out / CACHE_MANIFEST, manifest)
    return manifest


def read_cache(folder: Path, cfg) -> tuple[list[StoredVolume], dict[str, str], dict]:
    """The volumes of a cache, its unreadable files (``{path: reason}``) and its settings; refuses a
    cache whose sources changed since it was built, and options that contradict its settings."""
    manifest = json.loads((folder / CACHE_MANIFEST).read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"{folder} is a volume cache of format {manifest.get('format')}, this sparkmim reads format "
                        f"{CACHE_FORMAT}: rebuild it with sparkmim preprocess")
    settings, entries = manifest["settings"], manifest["volumes"]
    stale = [e for e in entries if _changed(e["sources"])]
    rebuild = f"sparkmim preprocess {manifest['source']} --out {folder}"
    if stale:
        raise DataError(f"{len(stale)} of the {len(entries)} volumes of the cache {folder} changed since it was built "
                        f"(first: {stale[0]['sources'][0]['path']}): update it with `{rebuild}`")
    _check_settings(cfg, settings, folder)
    volumes = [StoredVolume(folder / e["array"], e["name"]) for e in entries]
    if not volumes:
        raise DataError(f"the cache {folder} holds no readable volume (its build listed {len(manifest['bad'])} "
                        f"unreadable files)")
    return volumes, {b["path"]: b["reason"] for b in manifest.get("bad", [])}, settings


def _changed(sources: list[dict]) -> bool:
    for s in sources:
        try:
            st = os.stat(s["path"])
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) != (s["size"], s["mtime_ns"]):
            return True
    return False


def _check_settings(cfg, settings: dict, folder: Path) -> None:
    """The cache's channels, spacing and foreground crop against the run's options: a channel count
    other than the cache's is refused; so are --spacing and --foreground-crop that differ from it
    (the cache holds its volumes as built)."""
    from .config import parse_spacing

    if settings["in_chans"] != cfg.in_chans:
        raise ConfigError(f"the cache {folder} holds volumes of {settings['in_chans']} channel(s): use --in-chans "
                          f"{settings['in_chans']}, not {cfg.in_chans}", ["in_chans"])
    spacing = parse_spacing(cfg.spacing)
    built = settings["spacing"] and tuple(settings["spacing"])
    if spacing is not None and spacing != built or cfg.foreground_crop and not settings["foreground_crop"]:
        shown = "the files' own voxel grid" if built is None else f"spacing {','.join(map(str, built[::-1]))} (X,Y,Z)"
        raise ConfigError(f"the cache {folder} was built with {shown} and foreground crop "
                          f"{str(settings['foreground_crop']).lower()}; leave --spacing and --foreground-crop out (the "
                          f"cache's apply), or build another cache with sparkmim preprocess", ["spacing", "foreground_crop"])
