"""Pretraining input pipeline throughput: mimkit's lazy loader against the official MAE pipeline.

    python benchmarks/data_throughput.py --images 20000 --out benchmarks/results/data_throughput_cpu.json

Generates (once, under --folder) a synthetic ImageFolder of JPEGs at ImageNet-like sizes (around
500x375, smooth content plus noise so files are ~50-150 KB like photos; a few greyscale and CMYK
files as in ImageNet), then measures images/s of two loaders over the same files at 224 px:

* official: torchvision ``ImageFolder`` + ``RandomResizedCrop(224, scale=(0.2, 1), bicubic)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (MAE's main_pretrain.py), in a DataLoader;
* mimkit: the lazy folder index + :class:`mimkit.data.lazy.PretrainCrop` (the same crop, left in
  uint8) + the engine's per-sample seeding, with the float conversion and normalisation of every
  batch done by :class:`mimkit.data.device.DeviceNormalize` in the main process (here the
  "device" is the same CPU, so that cost is counted).

Both use the same batch size, worker count, pinned memory off (CPU) and persistent workers; runs
alternate (official, mimkit, official, ...) so drift hits both. Prints one JSON object: index
time, images/s per loader and worker count, their ratio, and peak RSS of the main process and
of the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from mimkit.data.device import DeviceNormalize
from mimkit.data.folder_index import index_folder
from mimkit.data.lazy import LazyImageDataset, PretrainCrop
from mimkit.engine.sampling import SeededSampler, SeededTransformDataset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_folder(root: Path, count: int, classes: int = 100, seed: int = 0) -> None:
    """ImageNet-like JPEGs: sizes around 500x375, smooth colour fields plus noise; 1 % grey, 0.2 % CMYK."""
    marker = root / f".complete-{count}"
    if marker.is_file():
        return
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.normal(500, 60)), int(rng.normal(375, 50))
        w, h = max(160, w), max(120, h)
        coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(im, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 100 == 7:
            im = im.convert("L")
        elif i % 500 == 11:
            im = im.convert("CMYK")
        folder = root / f"n{i % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:07d}.JPEG", quality=90)
    marker.write_text("")


def official_loader(root: Path, batch: int, workers: int) -> DataLoader:
    transform = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def mimkit_loader(root: Path, batch: int, workers: int, draft: bool) -> DataLoader:
    dataset = LazyImageDataset(index_folder(root, cache=root.parent / "index-cache"))
    items = SeededTransformDataset(dataset, PretrainCrop(224, scale=(0.2, 1.0), hflip=True, draft=draft))
    return DataLoader(items, batch_size=batch, sampler=SeededSampler(len(dataset), seed=0), num_workers=workers,
                      drop_last=True, persistent_workers=workers > 0)


def measure(loader: DataLoader, batches: int, normalize=None) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (workers started, files cached alike)."""
    iterator = iter(loader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images = next(iterator)[0]
        if normalize is not None:
            images = normalize(images)
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/bench_jpegs", help="where the synthetic JPEGs are generated once")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per loader and worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draft", action="store_true", help="also time mimkit with JPEG draft decoding")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders decode in workers; keep the main process from oversubscribing

    folder = Path(args.folder)
    start = time.perf_counter()
    make_folder(folder / "train", args.images)
    generate_s = time.perf_counter() - start
    cache = folder / "index-cache"
    for f in cache.glob("*.txt"):
        f.unlink()
    start = time.perf_counter()
    n = len(index_folder(folder / "train", cache=cache))
    index_cold = time.perf_counter() - start
    start = time.perf_counter()
    index_folder(folder / "train", cache=cache)
    index_warm = time.perf_counter() - start

    normalize = DeviceNormalize(MEAN, STD, 255.0, torch.device("cpu"))
    variants = {"official": lambda w: official_loader(folder / "train", args.batch_size, w),
                "mimkit": lambda w: mimkit_loader(folder / "train", args.batch_size, w, False)}
    if args.draft:
        variants["mimkit_draft"] = lambda w: mimkit_loader(folder / "train", args.batch_size, w, True)
    results: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for workers in args.workers:
        for _ in range(args.repeats):
            for name, build in variants.items():
                loader = build(workers)
                rate = measure(loader, args.batches, normalize if name.startswith("mimkit") else None)
                results[name].setdefault(str(workers), []).append(rate)
                del loader
                print(f"{name:13s} workers={workers}: {rate:7.1f} img/s", file=sys.stderr, flush=True)
    mean = {name: {w: float(np.mean(r)) for w, r in per.items()} for name, per in results.items()}
    report = {
        "benchmark": "data_throughput", "images": n, "img_size": 224, "batch_size": args.batch_size,
        "timed_batches": args.batches, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "generate_s": round(generate_s, 1), "index_cold_s": round(index_cold, 3), "index_cached_s": round(index_warm, 3),
        "images_per_s": mean, "runs": results,
        "ratio_mimkit_over_official": {w: mean["mimkit"][w] / mean["official"][w] for w in mean["official"]},
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "torch": torch.__version__,
    }
    if args.draft:
        report["ratio_draft_over_official"] = {w: mean["mimkit_draft"][w] / mean["official"][w] for w in mean["official"]}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
