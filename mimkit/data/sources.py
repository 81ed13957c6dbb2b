"""Image sources: the in-memory dataset, image file readers, and the array sources that fill it.

* a MedMNIST-style ``.npz`` file (``{split}_images``, ``{split}_labels``): :func:`load_npz`,
* ``digits`` (scikit-learn's bundled 8x8 digits: works offline, for demos and tests):
  :func:`load_digits`.

Folders of images are loaded by :func:`mimkit.data.collection.load_dataset`, which dispatches
between all sources.

Every problem a user can fix is raised as :class:`DataError` with one sentence naming the
problem and the fix.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mimkit.data import medmnist
from mimkit.data.folder_index import SPLITS
from mimkit.errors import DataError, MissingSplitError

TIFF_EXTENSIONS = (".tif", ".tiff")
MAX_CHANNELS = 64  # a 3-D TIFF axis this small or smaller can be the channel axis

# Value that maps to 1.0 for each supported storage dtype (float images are kept as they are).
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.float32): 1.0}



def storage_family(dtype: np.dtype) -> str:
    """The storage kind of image pixels: "uint8", "uint16" or "float"."""
    return "float" if dtype.kind == "f" else str(dtype)


class ImageDataset(Dataset):
    """Images held in memory in their native dtype, converted to float on access.

    Storage is channels-last: either one array ``[N, H, W, C]`` (all images the same size) or a
    list of ``[H, W, C]`` arrays (sizes differ). uint8 and uint16 stay as they are, so that a
    dataset costs 1 or 2 bytes per pixel in RAM; ``__getitem__`` converts one image.

    Args:
        images: ``[N, H, W]`` / ``[N, H, W, C]`` array, or a sequence of ``[H, W]`` /
            ``[H, W, C]`` arrays; dtype uint8, uint16 or float (floats are stored as float32
            and not rescaled).
        labels: ``[N]`` integer class indices, or None (unlabeled: every label is -1).
        class_names: names in label order; default ``["0", ..., str(num_classes - 1)]``.
        num_classes: default ``len(class_names)``, else ``max(label) + 1`` (0 if unlabeled).
        source: human-readable description of where the images came from.

    Attributes:
        num_channels (int), num_classes (int, 0 if unlabeled), class_names (list[str]),
        labels (LongTensor [N], -1 = unlabeled), image_size ((H, W) or None if sizes differ),
        source (str), dtype (numpy dtype of the stored pixels).

    ``ds[i]`` -> ``(image, label)``: image float32 ``[C, H, W]`` in [0, 1] (uint8 / 255,
    uint16 / 65535, float as stored), label an int.
    """

    def __init__(self, images, labels=None, *, class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, source: str = "in-memory images"):
        if isinstance(images, np.ndarray):
            if images.ndim == 3:  # [N, H, W] grey
                images = images[..., None]
            if images.ndim != 4:
                raise DataError(f"Images of {source} have shape {images.shape}: expected "
                                f"[N, H, W] or [N, H, W, C].")
            images = self._check_dtype(images, source)
            self._images: np.ndarray | list[np.ndarray] = images
            n = len(images)
            self.num_channels = int(images.shape[3])
            self.image_size: tuple[int, int] | None = (int(images.shape[1]),
                                                       int(images.shape[2]))
            self.dtype = images.dtype
        else:
            imgs = [im[..., None] if im.ndim == 2 else im for im in images]
            if not imgs:
                raise DataError(f"No images in {source}: give at least one image.")
            imgs = [self._check_dtype(im, source) for im in imgs]
            chans = Counter(im.shape[-1] for im in imgs)
            fams = Counter(storage_family(im.dtype) for im in imgs)
            if len(chans) > 1 or len(fams) > 1 or any(im.ndim != 3 for im in imgs):
                raise DataError(f"Images of {source} differ in channel count {dict(chans)} or "
                                f"dtype {dict(fams)}: give all images the same.")
            sizes = {im.shape[:2] for im in imgs}
            if len(sizes) == 1:  # one array: less overhead, cheaper subsets
                self._images = np.stack(imgs)
                self.image_size = tuple(int(s) for s in imgs[0].shape[:2])
            else:
                self._images = imgs
                self.image_size = None
            n = len(imgs)
            self.num_channels = int(imgs[0].shape[2])
            self.dtype = imgs[0].dtype
        self._scale = _SCALE[np.dtype(self.dtype)]

        if labels is None:
            self.labels = torch.full((n,), -1, dtype=torch.long)
        else:
            self.labels = torch.from_numpy(class_indices(labels, source)).reshape(-1)
            if len(self.labels) != n:
                raise DataError(f"{source} has {n} images but {len(self.labels)} labels: "
                                f"give one label per image.")
        labelled = labels is not None and n > 0 and bool((self.labels >= 0).any())
        if num_classes is None:
            if class_names is not None:
                num_classes = len(class_names)
            else:
                num_classes = int(self.labels.max()) + 1 if labelled else 0
        self.num_classes = int(num_classes)
        self.class_names = (list(class_names) if class_names is not None
                            else [str(i) for i in range(self.num_classes)])
        if labelled and int(self.labels.max()) >= self.num_classes:
            raise DataError(f"{source} has label {int(self.labels.max())} but only "
                            f"{self.num_classes} classes: fix the labels or the class list.")
        self.source = source

    @staticmethod
    def _check_dtype(a: np.ndarray, source: str) -> np.ndarray:
        if a.dtype.kind == "f":
            a = a.astype(np.float32, copy=False)
            bad = a.size - int(np.count_nonzero(np.isfinite(a)))
            if bad:  # one NaN pixel turns every loss and feature it touches into NaN
                raise DataError(f"Images of {source} have {bad} NaN or infinite pixel values: replace them "
                                f"(e.g. numpy.nan_to_num) or drop those images, then save the data again.")
            return a
        if a.dtype == np.bool_:
            return a.astype(np.uint8) * np.uint8(255)
        if a.dtype not in (np.uint8, np.uint16):
            raise DataError(f"Images of {source} have dtype {a.dtype}: convert them to 8- or "
                            f"16-bit unsigned integers or to float.")
        return a

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """-> (float32 [C, H, W] in [0, 1], int label)."""
        x = self._images[i]  # [H, W, C] native dtype (a view for the stacked array)
        # transpose + cast in one numpy copy; numpy handles uint16 everywhere, torch not always
        x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
        img = torch.from_numpy(x)
        if self._scale != 1.0:
            img.mul_(1.0 / self._scale)
        return img, int(self.labels[i])

    def smallest_size(self) -> tuple[int, int]:
        """(H, W) of the image with the shortest side (all images when they share one size)."""
        if self.image_size is not None:
            return self.image_size
        return min((tuple(int(s) for s in im.shape[:2]) for im in self._images), key=min)

    @property
    def storage(self) -> str:
        """Storage family of the pixels: "uint8", "uint16" or "float"."""
        return storage_family(np.dtype(self.dtype))

    @property
    def scale(self) -> float:
        """The stored value that means 1.0 (255, 65535, or 1 for floats)."""
        return self._scale

    def raw(self, i: int) -> np.ndarray:
        """Stored pixels of image ``i``: ``[H, W, C]`` in the native dtype (no copy)."""
        return self._images[i]

    def subset(self, indices) -> "ImageDataset":
        """New dataset with the images at ``indices`` (copied), same classes and class names.

        ``num_classes``/``class_names`` are kept even if some classes are absent from the subset
        (label-fraction runs must keep the full head size).
        """
        idx = np.asarray(torch.as_tensor(indices, dtype=torch.long).reshape(-1))
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset index out of range for a dataset of {len(self)} images")
        if isinstance(self._images, np.ndarray):
            imgs = self._images[idx]
        else:
            imgs = [self._images[int(j)] for j in idx]
        out = ImageDataset.__new__(ImageDataset)
        out.__dict__.update(self.__dict__)  # same attributes, then overwrite what changes
        out._images = imgs
        out.labels = self.labels[torch.from_numpy(idx)].clone()
        out.class_names = list(self.class_names)
        out.source = f"{self.source} (subset of {len(idx)})"
        return out

    def __repr__(self) -> str:
        size = "x".join(map(str, self.image_size)) if self.image_size else "mixed sizes"
        return (f"ImageDataset({len(self)} images, {self.num_channels} ch, {size}, "
                f"{self.dtype}, {self.num_classes} classes, source={self.source!r})")


def class_indices(labels, source: str) -> np.ndarray:
    """Labels as int64 class indices; whole-valued floats are accepted, anything else is a DataError."""
    a = np.asarray(labels)
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        fractional = ~np.isfinite(a) | (a != np.round(a))
        if fractional.any():
            raise DataError(f"{source} has {int(fractional.sum())} labels that are not whole numbers (e.g. "
                            f"{a[fractional].flat[0]}): store integer class indices 0, 1, ..., or drop the labels "
                            f"to use the images unlabelled.")
        return a.astype(np.int64)
    example = a.flat[0].item() if a.size else ""
    raise DataError(f"{source} has labels of type {a.dtype} (e.g. {example!r}): store integer class indices 0, 1, "
                    f"... (map each class name to its index), or drop the labels to use the images unlabelled.")


def check_patch_fits(dataset: ImageDataset, patch_size: int) -> None:
    """Refuse images whose shorter side is below one patch: resized up, they hold less than one token of detail."""
    h, w = dataset.smallest_size()
    if min(h, w) < patch_size:
        raise DataError(f"{dataset.source} has images of {h}x{w} pixels, smaller than one {patch_size}x{patch_size} "
                        f"patch: use images at least {patch_size} pixels on each side, or a model with a smaller "
                        f"patch_size.")


# ----------------------------------------------------------------------------- reading images

def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file as a channels-last array ``[H, W, C]`` in its native dtype.

    * PNG/JPEG/BMP/WebP via PIL: grey -> 1 channel, RGB -> 3, RGBA/LA -> alpha dropped (3/1),
      palette -> RGB, 16-bit grey -> uint16, 32-bit float -> float32.
    * TIFF via tifffile (multi-channel stacks, 8/16 bit): singleton axes are squeezed; a 2-D
      array is one channel; for a 3-D array the smallest axis (must be <= 64) is the channel
      axis, so both CHW and HWC stacks load as ``[H, W, C]``.

    Raises DataError if the file cannot be decoded or has an unsupported layout.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile
            a = np.asarray(tifffile.imread(path))
        else:
            a = _read_pil(path)
    except DataError:
        raise
    except Exception as e:  # decoder errors come in many types; all mean "bad file"
        raise DataError(f"Cannot read image {path} ({e}): remove or replace it.") from e
    return to_hwc(a, path)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("1", "LA", "La"):
            im = im.convert("L")  # bilevel -> 0/255; LA: drop alpha
        elif mode in ("RGBA", "RGBa", "RGBX"):
            im = im.convert("RGB")  # drop alpha: the channels carry no image content for MIM
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        a = np.asarray(im)
        if a.ndim == 3 and a.shape[2] == 4:  # palette with transparency -> drop alpha
            a = a[..., :3]
    if a.dtype.kind in "iu" and a.dtype.itemsize > 1 and a.dtype != np.uint16:
        # PIL gives 16-bit PNGs as mode "I"/"I;16" (int32/uint16): keep 16 bits if they fit
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"Image {path} has pixel values outside 0..65535: save it as 8- "
                            f"or 16-bit.")
        a = a.astype(np.uint16)
    return a


def to_hwc(a: np.ndarray, path: Path) -> np.ndarray:
    if a.ndim > 3:
        a = np.squeeze(a)  # e.g. (1, C, H, W) pages/z of length one
    if a.ndim == 2:
        return a[..., None]
    if a.ndim != 3:
        raise DataError(f"Image {path} has shape {a.shape}: save one 2-D image (optionally "
                        f"multi-channel) per file.")
    c_axis = int(np.argmin(a.shape))
    if a.shape[c_axis] > MAX_CHANNELS:
        raise DataError(f"Image {path} has shape {a.shape} and no axis of <= {MAX_CHANNELS} "
                        f"channels: save one 2-D (multi-channel) image per file, not a volume.")
    return np.ascontiguousarray(np.moveaxis(a, c_axis, -1))


# ----------------------------------------------------------------------------- loaders

def _check_split(split: str, available: Sequence[str], what: str) -> None:
    if split not in available:
        raise MissingSplitError(f"Unknown split '{split}' for {what}: choose one of "
                        f"{', '.join(available)}.")


def _medmnist_name(p: Path) -> str | None:
    """'bloodmnist' for bloodmnist.npz / bloodmnist_64.npz, else None."""
    stem = p.stem.lower()
    base = stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1].isdigit() else stem
    if base in medmnist.VOLUME_NAMES:
        raise DataError(f"{p.name} holds MedMNIST 3-D volumes, not 2-D images: use a 2-D "
                        f"MedMNIST dataset such as bloodmnist.")
    return base if base in medmnist.CLASS_NAMES else None


def _first_column(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return labels.reshape(len(labels), -1)[:, 0] if labels.ndim > 1 else labels


def load_npz(path: str | os.PathLike, split: str = "train") -> ImageDataset:
    """Load one split of a MedMNIST-style ``.npz`` (layout: :func:`mimkit.data.collection.load_dataset`)."""
    p = Path(path)
    try:
        npz = np.load(p, allow_pickle=False)  # never unpickle objects from a data file
        keys = set(npz.files)
    except Exception as e:
        raise DataError(f"Cannot read {p} ({e}): pass a valid .npz file.") from e
    with npz:
        available = [s for s in SPLITS if f"{s}_images" in keys]
        available += sorted(k[:-7] for k in keys if k.endswith("_images")
                            and k[:-7] not in SPLITS)
        if not available:
            raise DataError(f"{p} has no '<split>_images' array (it has {sorted(keys)}): use "
                            f"the MedMNIST layout train_images/train_labels/val_.../test_....")
        _check_split(split, available, p.name)
        try:
            images = npz[f"{split}_images"]
            label_keys = [f"{s}_labels" for s in available if f"{s}_labels" in keys]
            all_labels = {k: _first_column(npz[k]) for k in label_keys}
        except Exception as e:
            raise DataError(f"Cannot read {p} ({e}): the file is damaged, get it again.") from e
    all_labels = {k: class_indices(v, f"{p} [{k}]") for k, v in all_labels.items()}

    if images.ndim == 4 and images.shape[-1] > MAX_CHANNELS and images.shape[1] <= MAX_CHANNELS:
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # [N, C, H, W] -> NHWC
    labels = all_labels.get(f"{split}_labels")
    name = _medmnist_name(p)
    class_names = None
    num_classes = None
    if labels is not None:
        top = max(int(v.max()) for v in all_labels.values() if v.size)
        num_classes = top + 1
        if name is not None:
            if len(medmnist.CLASS_NAMES[name]) >= num_classes:
                class_names = medmnist.CLASS_NAMES[name]
                num_classes = len(class_names)
    return ImageDataset(images, labels, class_names=class_names, num_classes=num_classes,
                        source=f"{p} [{split}]")


def load_digits(split: str = "train", seed: int = 0) -> ImageDataset:
    """scikit-learn's digits (bundled with sklearn: offline), 1 channel 8x8 uint8, 10 classes.

    Split: within each class, a permutation from ``np.random.default_rng(seed)`` gives
    round(20 %) test, round(10 %) val and the rest train -> 1259 / 179 / 359 images. Written by
    hand (not ``train_test_split``) so it cannot change with the scikit-learn version.
    """
    _check_split(split, SPLITS, "digits")
    from sklearn.datasets import load_digits as _sk_digits
    d = _sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    target = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        n_test, n_val = round(0.2 * len(idx)), round(0.1 * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    idx = np.sort(np.concatenate(parts[split]))
    return ImageDataset(images[idx], target[idx], class_names=[str(i) for i in range(10)],
                        source=f"sklearn digits [{split}]")
