"""MedMNIST v2/v3 (MedMNIST+) files: official URLs, md5 checksums, a verified download cache.

``load_dataset("medmnist:bloodmnist@64")`` resolves here to a local ``.npz`` path:

1. the cache directory is ``$MIMKIT_DATA`` or ``~/.cache/mimkit``;
2. if ``bloodmnist_64.npz`` is already there and its md5 matches the official one, it is used
   (a small ``<file>.md5`` stamp remembers a successful check, so multi-GB files are not
   re-hashed on every run while their size and mtime are unchanged);
3. otherwise it is downloaded from the official Zenodo record to a temporary file in the same
   directory, its md5 is checked, and only then is it renamed into place, so an interrupted
   download never leaves a file that looks complete.

The table below is the official one from the ``medmnist`` package (``medmnist/info.py``,
version 3.0.2, Zenodo record 10519652). Only the 12 two-dimensional datasets are listed: the
3-D volumes (``organmnist3d`` ...) are not images and are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable
from urllib.error import URLError
from urllib.request import urlopen

from mimkit.errors import DataError

log = logging.getLogger(__name__)

# Official file URL pattern; the 28-px files have no size suffix ("bloodmnist.npz").
URL_PATTERN = "https://zenodo.org/records/10519652/files/{file}?download=1"
SIZES = (28, 64, 128, 224)

# name -> {size: md5} (official medmnist 3.0.2 info.py).
MD5: dict[str, dict[int, str]] = {
    "pathmnist": {
        28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
        128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    "chestmnist": {
        28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    "dermamnist": {
        28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
        128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    "octmnist": {
        28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
        128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "retinamnist": {
        28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
        128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    "breastmnist": {
        28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
        128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    "bloodmnist": {
        28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
        128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    "tissuemnist": {
        28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
        128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    "organamnist": {
        28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
        128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    "organcmnist": {
        28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
        128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    "organsmnist": {
        28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
        128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
}

_ORGAN = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
          "liver", "lung-left", "lung-right", "pancreas", "spleen"]

# name -> class names in label order (official). chestmnist is multi-label: mimkit keeps its
# first label column only (atelectasis yes/no), hence two names.
CLASS_NAMES: dict[str, list[str]] = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"],
    "chestmnist": ["no atelectasis", "atelectasis"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells",
                    "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"],
    "organamnist": _ORGAN,
    "organcmnist": _ORGAN,
    "organsmnist": _ORGAN,
}

# 3-D volume datasets of MedMNIST v2: recognised only to refuse them with a clear message.
VOLUME_NAMES = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                "vesselmnist3d", "synapsemnist3d")

_CHUNK = 1 << 20  # 1 MiB read size for hashing and downloading


def cache_dir() -> Path:
    """Directory of downloaded files: ``$MIMKIT_DATA`` if set, else ``~/.cache/mimkit``."""
    env = os.environ.get("MIMKIT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimkit"


def file_name(name: str, size: int = 28) -> str:
    """Official file name: ``bloodmnist.npz`` for 28 px, ``bloodmnist_64.npz`` otherwise."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def parse_spec(spec: str) -> tuple[str, int]:
    """``"medmnist:bloodmnist@64"`` (or ``"bloodmnist@64"``) -> ``("bloodmnist", 64)``.

    The size defaults to 28. Raises DataError for an unknown name or size.
    """
    body = spec.split(":", 1)[1] if spec.lower().startswith("medmnist:") else spec
    name, _, size_str = body.strip().lower().partition("@")
    if name in VOLUME_NAMES:
        raise DataError(f"MedMNIST dataset '{name}' holds 3-D volumes, not 2-D images: "
                        f"choose one of {', '.join(MD5)}.")
    if name not in MD5:
        raise DataError(f"Unknown MedMNIST dataset '{name}': choose one of {', '.join(MD5)}.")
    try:
        size = int(size_str) if size_str else 28
    except ValueError:
        size = -1
    if size not in SIZES:
        raise DataError(f"Unknown MedMNIST image size '{size_str}' in '{spec}': "
                        f"choose one of {', '.join(map(str, SIZES))}.")
    return name, size


def md5sum(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB chunks (constant memory)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def _stamp_value(path: Path, md5: str) -> str:
    st = path.stat()
    return f"{md5} {st.st_size} {st.st_mtime_ns}\n"


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Check a cached file's md5; raise DataError naming expected vs got if it differs.

    A successful check writes ``<file>.md5`` (md5, size, mtime); later calls trust it while the
    file's size and mtime are unchanged, so big files are hashed once, not on every run.
    """
    path = Path(path)
    stamp = _stamp_path(path)
    try:
        if stamp.read_text() == _stamp_value(path, expected):
            return
    except OSError:
        pass  # no stamp (or unreadable): hash the file
    got = md5sum(path)
    if got != expected:
        raise DataError(f"File {path} has md5 {got} but the official file has {expected}: "
                        f"delete it and retry (or download it again by hand).")
    try:
        stamp.write_text(_stamp_value(path, expected))
    except OSError:
        pass  # read-only cache: fine, we just hash again next time


def download(url: str, dest: str | os.PathLike, md5: str, *,
             opener: Callable | None = None) -> Path:
    """Download ``url`` to ``dest`` and check its md5; never leaves a partial ``dest``.

    Streams into a temporary file in ``dest``'s directory while hashing, then renames it onto
    ``dest`` (atomic on one file system) only if the md5 matches. ``opener(url)`` must return a
    file-like response (default ``urllib.request.urlopen``; ``file://`` URLs work too, which
    is how the tests run offline). Raises DataError if the download fails or the md5 differs.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = opener or urlopen
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        try:
            with os.fdopen(fd, "wb") as out, opener(url) as resp:
                total = int(resp.headers.get("Content-Length", 0) or 0) \
                    if getattr(resp, "headers", None) is not None else 0
                bar = _progress(total, dest.name)
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                bar.close()
                out.flush()
                os.fsync(out.fileno())
        except (URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(f"Cannot download {url} ({reason}): download it by hand and pass "
                            f"the .npz path instead (e.g. --data /path/to/{dest.name}).") from e
        got = h.hexdigest()
        if got != md5:
            raise DataError(f"Downloaded {url} has md5 {got} but the official file has {md5}: "
                            f"retry the download (the file was not kept).")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something failed
    try:
        _stamp_path(dest).write_text(_stamp_value(dest, md5))
    except OSError:
        pass
    return dest


def _progress(total: int, desc: str):
    """A tqdm bar if tqdm is installed (it comes with timm), else a no-op."""
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()


def fetch(spec: str, *, root: str | os.PathLike | None = None,
          opener: Callable | None = None) -> Path:
    """Local path of a verified MedMNIST file, downloading it once if needed.

    Args:
        spec: ``"medmnist:NAME"`` or ``"medmnist:NAME@SIZE"`` (SIZE in 28, 64, 128, 224).
        root: cache directory (default :func:`cache_dir`).
        opener: URL opener for :func:`download` (tests inject one).
    """
    name, size = parse_spec(spec)
    root = Path(root) if root is not None else cache_dir()
    dest = root / file_name(name, size)
    expected = MD5[name][size]
    if dest.exists():
        verify_md5(dest, expected)  # raises on mismatch; we never silently overwrite
        return dest
    url = URL_PATTERN.format(file=file_name(name, size))
    log.warning("Downloading %s to %s (once; md5-checked).", url, dest)
    return download(url, dest, expected, opener=opener)
