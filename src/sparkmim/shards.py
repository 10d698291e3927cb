"""Images in tar shards, as WebDataset writes them (``shards-{000000..000099}.tar``: members named
``KEY.EXT``, the image one of them), read by index with a plain tar reader.

The shards are indexed once per run: the tar headers alone are read (each member's name, data
offset and size), which is far less than the images. From then on a shard set is read like a
folder, one image by its offset (``os.pread``: no shared file position between data-loading
processes), so the sampler, the augmentation, unreadable-image handling and resume are the
folder loader's. "Exact" resume means what it means for a folder: each epoch's order is a seeded
permutation of all images of all shards, and a resumed run continues that order at the position
it stopped at, with the same augmentation and masks. (A streaming reader that shuffles within a
buffer cannot resume so; it would need the shards' order and buffer state saved.)
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from .data import ImageFiles, is_image_name, load_image, read_image
from .inputs import PathList, is_label_map

__all__ = ["ShardIndex", "index_shards", "ShardImages"]

_OPEN = 64  # shards a process keeps open at once


class ShardIndex:
    """Where each image of a shard set is: ``shard`` (index into ``shards``), ``offset`` and
    ``size`` of its bytes, and its name as ``SHARD.tar/MEMBER`` (``names``, a :class:`PathList`)."""

    def __init__(self, shards: list[Path], shard: np.ndarray, offset: np.ndarray, size: np.ndarray, names: PathList):
        self.shards, self.shard, self.offset, self.size, self.names = shards, shard, offset, size, names

    def __len__(self) -> int:
        return len(self.names)


def index_shards(shards: list[Path]) -> ShardIndex:
    """The image members of ``shards`` (in shard order, then as stored), from their tar headers;
    label maps (``*_seg.*``) left out. ``ValueError`` names a file that is not a tar archive."""
    shard, offset, size, names = [], [], [], []
    for i, path in enumerate(shards):
        try:
            members = _members(path)
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ValueError(f"cannot read the shard {path}: {e}") from e
        for name, start, length in members:
            if is_image_name(name) and not is_label_map(name):
                shard.append(i)
                offset.append(start)
                size.append(length)
                names.append(f"{path}/{name}")
    return ShardIndex(list(shards), np.asarray(shard, dtype=np.int32), np.asarray(offset, dtype=np.int64),
                      np.asarray(size, dtype=np.int64), PathList(names))


def _members(path: Path) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular file of a tar archive, read from the 512-byte
    headers alone (POSIX ustar and GNU headers, as WebDataset's writers make them); an archive
    with other entries (long names, pax headers, sparse files) or a damaged header is read with
    :mod:`tarfile`, which checks every header."""
    import mmap

    out = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return out
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the pages of the headers alone are read
        position = 0
        while True:
            header = data[position:position + 512]
            if len(header) < 512 or header == _ZERO:
                return out
            kind = header[156:157]
            if kind not in (b"0", b"\0", b"5") or header[257:262] != b"ustar":
                return _members_by_tarfile(path)  # something this reader does not handle: the full reader
            try:
                size = int(header[124:136].strip(b" \0") or b"0", 8)
            except ValueError:  # a damaged header: the full reader says what is wrong
                return _members_by_tarfile(path)
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345:346] != b"\0":  # ustar prefix
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind != b"5":
                out.append((name.decode("utf-8", "surrogateescape"), position + 512, size))
            position += 512 + (size + 511) // 512 * 512


def _members_by_tarfile(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


_ZERO = bytes(512)
class ShardImages(ImageFiles):
    """Augmented crops of the images of a :class:`ShardIndex`, as :class:`~sparkmim.data.ImageFiles`
    reads a folder's (paths are ``SHARD.tar/MEMBER``)."""

    def __init__(self, index: ShardIndex, transform, channels: int = 3, max_skips: int = 64,
                 fast_decode: tuple[int, float] | None = None):
        super().__init__(index.names, transform, channels, max_skips, fast_decode)
        self.index = index
        self._files: dict[int, int] = {}  # shard -> open descriptor, per process

    def _read(self, index: int):
        return read_image(self.paths[index], self.channels, *(self.fast_decode or (None, 1.0)), data=self._bytes(index))

    def full_image(self, index: int):
        import io

        return load_image(io.BytesIO(self._bytes(index)), self.channels)

    def _bytes(self, index: int) -> bytes:
        """The stored bytes of image ``index``."""
        shard = int(self.index.shard[index])
        fd = self._files.get(shard)
        if fd is None or self._pid != os.getpid():
            if self._pid != os.getpid() or len(self._files) >= _OPEN:  # a new process, or too many open
                for other in self._files.values() if self._pid == os.getpid() else ():
                    os.close(other)
                self._files, self._pid = {}, os.getpid()
            fd = self._files[shard] = os.open(self.index.shards[shard], os.O_RDONLY)
        data = os.pread(fd, int(self.index.size[index]), int(self.index.offset[index]))
        if len(data) != int(self.index.size[index]):
            raise ValueError(f"the shard ends {int(self.index.size[index]) - len(data)} bytes short of this image")
        return data

    _pid = -1
