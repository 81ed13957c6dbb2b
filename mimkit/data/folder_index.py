"""The file index of an image folder: scanned once, cached, invalidated when the folder changes.

A collection of a million files (ImageNet) must not be listed again at every start, and must
not be read into memory to be listed at all. :func:`index_folder` walks the split folder with
``os.scandir`` (no ``Path`` objects per file), labels files by their ImageFolder class
sub-folder, and stores the result in a small text file under the cache folder. The cache
records the modification time of every directory it walked: adding, removing or renaming a
file changes its directory's mtime, so a stale index is noticed with one ``stat`` per
directory (about a thousand for ImageNet) instead of one per file.

Layout rules (the same as the in-memory folder loader):

* a ``train/`` sub-folder makes ``train/``, ``val/``, ``test/`` the splits; otherwise the folder
  is the ``train`` split;
* if every image of every split sits directly in a class sub-folder, the sorted union of the
  sub-folder names are the classes (so indices agree between splits); otherwise unlabeled.

Several roots (``data.path: [a, b]``) are indexed one by one and concatenated by
:func:`merge_indices`, with class names merged by name.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mimkit.errors import DataError, MissingSplitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1


@dataclass
class FileIndex:
    """Files of one split, in sorted order.

    files: absolute paths ``[N]``; labels: int64 ``[N]`` class indices (-1 = unlabeled);
    class_names: names in label order (empty when unlabeled); root: the split folder(s).
    """

    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    root: str

    def __len__(self) -> int:
        return len(self.files)

    def select(self, indices) -> "FileIndex":
        """The files at ``indices`` (in that order), same classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return FileIndex([self.files[i] for i in idx], self.labels[idx], list(self.class_names), self.root)


class PathTable(Sequence):
    """Paths held as one UTF-8 buffer plus offsets (two numpy arrays) instead of a list of ``str``.

    DataLoader workers are forked: memory is shared until a page is written, and reading a ``str``
    of a list writes its reference count, so a list of a million paths ends up copied into every
    worker (about 1 GB for ImageNet with 8 workers, invisible to RSS, visible to PSS). Reading a
    path here only creates a temporary string. ``table[i]`` -> str; equal to any sequence of the
    same paths.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"path {i} of {len(self)}")
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths)"


def split_folder(root: Path, split: str) -> tuple[Path, dict[str, Path]]:
    """(folder of ``split``, every split folder) under ``root``; DataError for an unknown split."""
    split_roots = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_roots:
        if split != "train":
            raise MissingSplitError(f"Unknown split '{split}' for folder {root}: it has no train/ sub-folder, so only "
                            f"split 'train' exists (add train/, val/, test/ sub-folders to have more).")
        return root, {"train": root}
    if split not in split_roots:
        raise MissingSplitError(f"Unknown split '{split}' for folder {root}: choose one of {', '.join(split_roots)}.")
    return split_roots[split], split_roots


def _walk(top: str) -> tuple[list[str], dict[str, int]]:
    """(image paths relative to ``top`` in sorted-walk order; {directory: mtime_ns} of every directory walked)."""
    files: list[str] = []
    mtimes: dict[str, int] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(top, rel) if rel else top
        with os.scandir(path) as entries:
            mtimes[rel] = os.stat(path).st_mtime_ns
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    stack.append(name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(name)
    files.sort(key=_walk_order)
    return files, mtimes


def _walk_order(rel: str) -> list[tuple[int, str]]:
    """Sort key of a sorted ``os.walk``: a folder's files (by name) before its sub-folders (by name)."""
    *folders, name = rel.split("/")
    return [(1, f) for f in folders] + [(0, name)]


def _class_of(rel: str) -> str | None:
    """The class sub-folder of ``<class>/<file>``; None for a top-level or deeper file."""
    parts = rel.split("/")
    return parts[0] if len(parts) == 2 else None


def cache_dir() -> Path:
    """``$MIMKIT_DATA/index`` or ``~/.cache/mimkit/index``."""
    base = os.environ.get("MIMKIT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "mimkit")
    return Path(base) / "index"


def _cache_path(folder: Path, where: Path) -> Path:
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return where / f"{folder.name or 'root'}-{digest}.txt"


def _read_cache(path: Path, top: str) -> tuple[list[str], dict[str, int]] | None:
    """The cached listing of ``top`` if every directory it walked still has its recorded mtime."""
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
            if header.get("version") != _CACHE_VERSION or header.get("top") != top:
                return None
            mtimes = header["mtimes"]
            for rel, mtime in mtimes.items():
                if os.stat(os.path.join(top, rel) if rel else top).st_mtime_ns != mtime:
                    return None
            files = f.read().split("\n")
    except (OSError, ValueError, KeyError):
        return None  # missing, unreadable or stale: scan again
    return [f for f in files if f], mtimes


def _write_cache(path: Path, top: str, files: list[str], mtimes: dict[str, int]) -> None:
    """Write atomically; a cache that cannot be written only costs the next scan."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"version": _CACHE_VERSION, "top": top, "mtimes": mtimes}) + "\n")
            f.write("\n".join(files))
        os.replace(tmp, path)
    except OSError:
        pass


def list_images(folder: Path, cache: Path | None = None) -> list[str]:
    """Sorted image paths relative to ``folder`` (via the cache in ``cache`` when it is fresh)."""
    top = str(folder.resolve())
    path = _cache_path(folder, cache) if cache is not None else None
    cached = _read_cache(path, top) if path is not None and path.is_file() else None
    if cached is not None:
        return cached[0]
    files, mtimes = _walk(top)
    if path is not None:
        _write_cache(path, top, files, mtimes)
    return files


def index_folder(path: str | os.PathLike, split: str = "train", cache: Path | None = None) -> FileIndex:
    """The :class:`FileIndex` of ``split`` under the folder ``path`` (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"Data path {root} is not a folder: pass a folder of images.")
    folder, split_roots = split_folder(root, split)
    listings = {s: list_images(r, cache) for s, r in split_roots.items()}
    files = listings[split]
    if not files:
        raise DataError(f"No images found under {folder}: expected PNG/JPEG/BMP/TIFF files, optionally in class "
                        f"sub-folders.")
    classes = {s: [_class_of(f) for f in fs] for s, fs in listings.items()}
    labelled = all(c is not None for cs in classes.values() for c in cs)
    if labelled:
        class_names = sorted({c for cs in classes.values() for c in cs})
        lookup = {c: i for i, c in enumerate(class_names)}
        labels = np.fromiter((lookup[c] for c in classes[split]), dtype=np.int64, count=len(files))
    else:
        class_names, labels = [], np.full(len(files), -1, dtype=np.int64)
    top = str(folder.resolve())
    return FileIndex([os.path.join(top, f) for f in files], labels, class_names, top)


def merge_indices(indices: list[FileIndex]) -> FileIndex:
    """Concatenate several roots' indices; classes are merged by name (sorted union).

    Either all roots are labelled or none: mixing would leave some files without a class.
    """
    if len(indices) == 1:
        return indices[0]
    labelled = [bool(ix.class_names) for ix in indices]
    if any(labelled) and not all(labelled):
        unlabelled = next(ix.root for ix, lab in zip(indices, labelled) if not lab)
        raise DataError(f"Folder {unlabelled} has no class sub-folders but the other data.path roots do: give every "
                        f"root the same layout.")
    names = sorted({c for ix in indices for c in ix.class_names})
    lookup = {c: i for i, c in enumerate(names)}
    files: list[str] = []
    labels = []
    for ix in indices:
        files += ix.files
        if names:
            remap = np.array([lookup[c] for c in ix.class_names], dtype=np.int64)
            labels.append(remap[ix.labels])
        else:
            labels.append(ix.labels)
    return FileIndex(files, np.concatenate(labels), names, " + ".join(ix.root for ix in indices))


def first_per_class(index: FileIndex, fraction: float) -> FileIndex:
    """The first ``ceil(fraction x n_c)`` files of each class in sorted file order (the iBOT fork's
    "first 20 % of every class" subsets); an unlabeled index is treated as one class."""
    labels = index.labels
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # already in sorted file order
        keep.append(members[: int(np.ceil(fraction * len(members)))])
    return index.select(np.sort(np.concatenate(keep)))


def random_fraction(index: FileIndex, fraction: float, seed: int) -> FileIndex:
    """A seeded random ``fraction`` of the files (kept in sorted order), at least one file."""
    n = len(index)
    count = max(1, int(round(fraction * n)))
    picks = np.random.default_rng(seed).choice(n, size=count, replace=False)
    return index.select(np.sort(picks))


def from_file_list(index: FileIndex, list_path: str | os.PathLike) -> FileIndex:
    """The files named in ``list_path`` (one path per line, absolute or relative to the split
    folder; blank lines and ``#`` comments ignored), in the list's order."""
    list_path = Path(list_path).expanduser()
    try:
        lines = list_path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"Cannot read the file list {list_path} ({exc.strerror}): pass a text file with one image "
                        f"path per line.") from None
    position = {f: i for i, f in enumerate(index.files)}
    wanted, missing = [], []
    for line in lines:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        full = os.path.normpath(name if os.path.isabs(name) else os.path.join(index.root, name))
        (wanted if full in position else missing).append(full)
    if missing:
        raise DataError(f"{len(missing)} files of {list_path} are not images of {index.root} (first: {missing[0]}): "
                        f"fix the list or data.path.")
    if not wanted:
        raise DataError(f"The file list {list_path} names no images: give one path per line.")
    return index.select([position[f] for f in wanted])
