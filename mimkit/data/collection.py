"""Datasets as a run asks for them: a path (or several folder roots), a subset, in memory or lazily.

``load_dataset(path, split)`` is the one entry point that turns a ``data.path`` into a dataset:

* ``"digits"``, ``"medmnist:NAME[@SIZE]"`` or a MedMNIST-style ``.npz`` file
  (:mod:`mimkit.data.sources`): arrays, always in memory;
* a folder of images, or a list of folder roots (class names merged by name): indexed once
  (:mod:`mimkit.data.folder_index`) and decoded by the rules of :mod:`mimkit.data.lazy`
  (greyscale, palette, RGBA and CMYK files converted to the dataset's channel count), then held
  in memory as an :class:`~mimkit.data.sources.ImageDataset`.

:func:`open_pretrain_data` is what pretraining uses: it also applies ``data.subset`` and
``data.in_memory`` (``auto`` keeps a folder in memory only when its estimated decoded size fits
comfortably; otherwise files are decoded per item in the DataLoader workers) and the
``data.on_error`` policy for unreadable files.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mimkit.data import medmnist
from mimkit.data.folder_index import FileIndex, cache_dir, first_per_class, from_file_list, index_folder
from mimkit.data.folder_index import merge_indices, random_fraction
from mimkit.data.lazy import LazyImageDataset
from mimkit.data.sources import ImageDataset, load_digits, load_npz, storage_family
from mimkit.errors import ConfigError, DataError

# A folder stays in memory under in_memory=auto when its decoded pixels take at most this share of
# the memory available to each local process: the rest is for the model, the workers and the OS.
_MEMORY_SHARE = 0.5
_ARRAY_SOURCES = "a .npz file, 'digits' or 'medmnist:NAME[@SIZE]'"


@dataclass
class PretrainData:
    """The pretraining split.

    dataset: ImageDataset (in memory) or LazyImageDataset; lazy: which of the two;
    folder: the images came from files (so they are cropped as files are, by PretrainCrop);
    unreadable: files skipped while loading into memory (``on_error=skip``);
    num_files: files selected, readable or not (the denominator of ``data.max_bad_fraction``).
    """

    dataset: Any
    lazy: bool
    folder: bool
    unreadable: list[str] = field(default_factory=list)
    num_files: int = 0


def _roots(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    return [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]


def _array_source(spec: str, split: str) -> ImageDataset | None:
    """digits / medmnist / .npz as an ImageDataset, or None when ``spec`` names something else."""
    if spec.strip().lower() == "digits":
        return load_digits(split)
    if spec.strip().lower().startswith("medmnist:"):
        return load_npz(medmnist.fetch(spec), split)
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"Data path {p} does not exist: pass a folder of images, {_ARRAY_SOURCES}.")
    if p.is_dir():
        return None
    if p.suffix.lower() == ".npz":
        return load_npz(p, split)
    raise DataError(f"Cannot load {p}: pass a folder of images, {_ARRAY_SOURCES}.")


def folder_index(roots: list[str], split: str) -> FileIndex:
    """The index of ``split`` over one or several folder roots (cached under ``$MIMKIT_DATA/index``)."""
    for root in roots:
        if not Path(root).expanduser().is_dir():
            raise DataError(f"Data path {root} is not a folder: every entry of a data.path list must be a folder "
                            f"of images ({_ARRAY_SOURCES} can only be used alone).")
    return merge_indices([index_folder(r, split, cache_dir()) for r in roots])


def load_dataset(path: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train", *,
                 on_error: str = "raise") -> ImageDataset:
    """Load ``split`` ("train", "val" or "test") of ``path`` into memory.

    ``path`` may be:

    * ``"digits"``: scikit-learn's 1797 8x8 grey digits (values 0..16 -> uint8 x*255/16,
      10 classes), split per class with a fixed seed: 1259 / 179 / 359 images;
    * ``"medmnist:NAME"`` or ``"medmnist:NAME@SIZE"``: the official MedMNIST file, downloaded
      once into ``$MIMKIT_DATA`` (default ``~/.cache/mimkit``) and md5-checked;
    * a ``.npz`` file in the MedMNIST layout: ``{split}_images`` ``[N, H, W]`` or
      ``[N, H, W, C]`` (uint8/uint16/float) and optional ``{split}_labels`` ``[N]`` or ``[N, 1]``
      (multi-label ``[N, k]`` keeps its first column; ``num_classes`` is taken over all splits);
    * a folder, or a list of folders: a ``train/`` sub-folder makes ``train/``, ``val/``,
      ``test/`` the splits, class sub-folders give labels (ImageFolder), see
      :mod:`mimkit.data.folder_index`; files are decoded as :class:`LazyImageDataset` decodes them.

    Raises DataError for a missing path, unknown kind, unknown split or (``on_error="raise"``) an
    unreadable image. With ``on_error="skip"`` unreadable files are left out and listed in the
    dataset's ``unreadable`` attribute.
    """
    roots = _roots(path)
    if len(roots) == 1:
        arrays = _array_source(roots[0], split)
        if arrays is not None:
            return arrays
    return decode_all(LazyImageDataset(folder_index(roots, split), on_error=on_error))


def decode_all(lazy: LazyImageDataset, workers: int | None = None) -> ImageDataset:
    """Every file of ``lazy`` decoded into an :class:`ImageDataset` (threads: decoders release the GIL).

    Unreadable files raise, or under ``on_error="skip"`` are dropped and listed in ``unreadable``.
    """
    def read(i: int):
        try:
            return lazy.decode(i)
        except DataError:
            if lazy.on_error == "raise":
                raise
            return None

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(read, range(len(lazy))))
    keep = [i for i, im in enumerate(decoded) if im is not None]
    if not keep:
        raise DataError(f"None of the {len(lazy)} files under {lazy.source} could be read: check the data.")
    images = [decoded[i] for i in keep]
    _check_one_bit_depth(images, [lazy.files[i] for i in keep])
    labels = lazy.labels.numpy()[keep] if lazy.class_names else None
    dataset = ImageDataset(images, labels, class_names=lazy.class_names or None, source=lazy.source)
    dataset.unreadable = [lazy.files[i] for i, im in enumerate(decoded) if im is None]
    return dataset


def _check_one_bit_depth(images: list[np.ndarray], files: list[str]) -> None:
    """Name the odd file out rather than failing on a generic dtype error."""
    families = Counter(storage_family(im.dtype) for im in images)
    if len(families) > 1:
        common = families.most_common(1)[0][0]
        bad, im = next((f, im) for f, im in zip(files, images) if storage_family(im.dtype) != common)
        raise DataError(f"Image {bad} is {im.dtype} but the others are {common}: give all images the same bit depth.")


def select_subset(index: FileIndex, subset: str | None, fraction: float | None, seed: int,
                  file_list: str | None) -> FileIndex:
    """``data.subset``: first_per_class / random (with ``fraction``), file_list (with ``file_list``)."""
    if subset is None:
        return index
    if subset == "file_list":
        if not file_list:
            raise ConfigError("data.subset=file_list needs data.subset_file=PATH (one image path per line).")
        return from_file_list(index, file_list)
    if fraction is None:
        raise ConfigError(f"data.subset={subset} needs data.subset_fraction, e.g. data.subset_fraction=0.2.")
    if subset == "first_per_class":
        return first_per_class(index, fraction)
    return random_fraction(index, fraction, seed)


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable of /proc/meminfo, else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def choose_in_memory(lazy: LazyImageDataset, setting: bool | str, say: Callable[[str], None]) -> bool:
    """``data.in_memory``: true / false as given; auto from the decoded-size estimate, said aloud."""
    if setting is not True and setting is not False:
        need = lazy.decoded_bytes()
        per_process = available_memory() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        setting = need <= _MEMORY_SHARE * per_process
        say(f"data.in_memory=auto: {len(lazy)} images of {lazy.source} take about {_gib(need)} decoded, "
            f"{_gib(per_process)} is available per process: "
            + ("loading them into memory." if setting else
               "decoding them per batch in the DataLoader workers (set data.in_memory=true to override)."))
    return bool(setting)


def open_pretrain_data(d, split: str, say: Callable[[str], None] = print) -> PretrainData:
    """The pretraining split of data config ``d`` (``path``, ``subset*``, ``in_memory``, ``on_error``)."""
    roots = _roots(d.path)
    if len(roots) == 1:
        arrays = _array_source(roots[0], split)
        if arrays is not None:
            if d.subset is not None:
                raise ConfigError(f"data.subset selects files of image folders, but data.path is {roots[0]}: "
                                  f"remove data.subset or point data.path at a folder.")
            if d.in_memory is False:
                say(f"note: {roots[0]} is an array file, so it is held in memory (data.in_memory=false applies to "
                    f"image folders).")
            return PretrainData(arrays, lazy=False, folder=False, num_files=len(arrays))
    index = select_subset(folder_index(roots, split), d.subset, d.subset_fraction, d.subset_seed, d.subset_file)
    lazy = LazyImageDataset(index, on_error=d.on_error)
    if not choose_in_memory(lazy, d.in_memory, say):
        return PretrainData(lazy, lazy=True, folder=True, num_files=len(lazy))
    dataset = decode_all(lazy)
    return PretrainData(dataset, lazy=False, folder=True, unreadable=dataset.unreadable, num_files=len(lazy))
