"""What ``--data`` is, decided once where it is read, and the listing of large folders.

``--data`` names one of these kinds (:func:`data_input`):

==========================  =====================================================================
``demo``                    the built-in samples (photographs; MRI volumes for 3-D models)
``folder``                  a folder, searched recursively for the modality's files
``list``                    a text file of paths, one per line
``shards``                  tar shards, ``shards-{000000..000099}.tar`` or one ``.tar`` (images)
``nnunet-raw``              an nnU-Net raw dataset folder (``dataset.json``, ``imagesTr/``)
``nnunet-preprocessed``     an nnU-Net preprocessed dataset folder (plans, ``nnUNetPlans_3d_fullres/``)
``cache``                   a volume cache written by ``sparkmim preprocess`` (``sparkmim-cache.json``)
==========================  =====================================================================

The modality then reads the kinds it knows (:meth:`~sparkmim.modality.Modality.pretrain_data`);
nothing else asks which kind it is.

Folders are listed with :func:`os.scandir`, which gives each entry's type from the directory
itself, so no file is stat'ed: a million files list in seconds. Label maps are never samples:
the folders nnU-Net keeps them in (``labelsTr``, ``labelsTs``, ``gt_segmentations``) are not
entered, and files named ``*_seg.*`` are left out.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataInput", "data_input", "walk_files", "is_label_map", "LABEL_FOLDERS", "PathList", "CACHE_MANIFEST",
           "expand_shards", "nnunet_plans_in", "listed_once", "KINDS"]

DEMO = "demo"
KINDS = {"demo": "the built-in demo data", "folder": "a folder", "list": "a file list", "shards": "a set of tar shards",
         "nnunet-raw": "an nnU-Net raw dataset", "nnunet-preprocessed": "an nnU-Net preprocessed dataset",
         "cache": "a volume cache (sparkmim preprocess)"}  # each kind, for messages
CACHE_MANIFEST = "sparkmim-cache.json"  # the file that makes a folder a sparkmim volume cache
LABEL_FOLDERS = frozenset({"labelsTr", "labelsTs", "gt_segmentations"})  # nnU-Net's folders of label maps
_SEG = re.compile(r"_seg\.[^/]+$", re.IGNORECASE)  # CASE_seg.nii.gz, CASE_seg.b2nd: nnU-Net's label maps
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class DataInput:
    """One ``--data`` value, decided: its ``kind`` (see the module notes) and its ``path`` (the
    folder or file; None for ``demo``); ``shards``: the tar files of a ``shards`` input."""

    kind: str
    path: Path | None
    shards: tuple[Path, ...] = ()

    def __str__(self) -> str:
        return DEMO if self.path is None else str(self.path)


def data_input(data: str) -> DataInput:
    """What ``data`` (a ``--data`` value) is; ``FileNotFoundError`` for a path that does not
    exist (shards: naming the first missing shard)."""
    if data == DEMO:
        return DataInput(DEMO, None)
    path = Path(data)
    if _BRACES.search(data) or (data.endswith(".tar") and not path.is_dir()):
        return DataInput("shards", path, tuple(expand_shards(data)))
    if path.is_dir():
        if (path / CACHE_MANIFEST).is_file():
            return DataInput("cache", path)
        if (path / "dataset.json").is_file() and (path / "imagesTr").is_dir():
            return DataInput("nnunet-raw", path)
        if (path / "dataset.json").is_file() and nnunet_plans_in(path):
            return DataInput("nnunet-preprocessed", path)
        return DataInput("folder", path)
    if path.is_file():
        return DataInput("list", path)
    raise FileNotFoundError(f"data path {path} does not exist: give a folder, a text file of paths, or 'demo'")


def nnunet_plans_in(folder: Path) -> list[Path]:
    """The nnU-Net plans files of a preprocessed dataset folder (JSON files with ``configurations``
    whose data folder, the configuration's ``data_identifier``, is there), sorted."""
    found = []
    for p in sorted(folder.glob("*.json")):
        try:
            plans = json.loads(p.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        confs = plans.get("configurations") if isinstance(plans, dict) else None
        if isinstance(confs, dict) and any(isinstance(c, dict) and (folder / str(c.get("data_identifier"))).is_dir()
                                           for c in confs.values()):
            found.append(p)
    return found


def expand_shards(spec: str) -> list[Path]:
    """The tar files of ``shards-{000000..000099}.tar`` (numbers zero-padded to the width written;
    several brace ranges expand in turn) or of one ``.tar``; each must exist."""
    paths = [Path(p) for p in _expand(spec)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} does not exist ({len(missing)} of the {len(paths)} shards of "
                                f"{spec} are missing)")
    return paths


def _expand(spec: str) -> list[str]:
    m = _BRACES.search(spec)
    if m is None:
        return [spec]
    first, last = m.group(1), m.group(2)
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    return [p for i in range(int(first), int(last) + 1) for p in _expand(spec[:m.start()] + str(i).zfill(width) +
                                                                        spec[m.end():])]


def is_label_map(name: str) -> bool:
    """Whether a file name is a label map by nnU-Net's naming (``*_seg.*``)."""
    return bool(_SEG.search(name))


def walk_files(root: str | Path, accept: Callable[[str], bool]) -> PathList:
    """The files under ``root`` (recursively, sorted) whose names ``accept`` takes, listed with
    :func:`os.scandir` alone (no stat per file; symbolic links to files are followed as the
    directory entry says); hidden folders, label-map folders and label-map files are skipped."""
    found: list[str] = []
    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folder: its files cannot be samples
            continue
        for entry in entries:
            name = entry.name
            if entry.is_dir():
                if not name.startswith(".") and name not in LABEL_FOLDERS:
                    stack.append(entry.path)
            elif accept(name) and not is_label_map(name) and entry.is_file():
                found.append(entry.path)
    found.sort()
    return PathList(found)


class PathList(Sequence):
    """A long list of paths held as one UTF-8 buffer and an offset array: items are ``Path``s, and a
    data-loading worker that reads it touches no per-path Python object (a list of a million
    ``Path``s would be copied page by page into every worker as their reference counts change)."""

    def __init__(self, paths):
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self._offsets[index], self._offsets[index + 1]
        return Path(os.fsdecode(self._buffer[start:end].tobytes()))


def listed_once(make):
    """``make()`` (a listing) done by rank 0 alone and its result given to every rank, so that a
    large folder is listed once per run; with one process, just ``make()``. A listing that fails
    fails on every rank, with rank 0's message."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return make()
    result, problem = None, None
    if dist.get_rank() == 0:
        try:
            result = make()
        except Exception as e:
            problem = e
    box = [result, None if problem is None else str(problem)]
    dist.broadcast_object_list(box, src=0)
    if problem is not None:
        raise problem
    if box[1] is not None:
        raise ValueError(box[1])
    return box[0]
