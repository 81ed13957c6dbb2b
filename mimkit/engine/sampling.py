"""World-size-independent data order and per-sample randomness.

Every sample of every epoch gets a seed that depends only on (run seed, epoch, dataset index).
Its augmentation and its mask are drawn from that seed, and the global batch at step t is the
same set of samples for one process with batch 2B and for two processes with batch B. Hence a
torchrun run follows the single-process loss curve, and a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mimkit.errors import ConfigError


_MASK63, _MASK64 = (1 << 63) - 1, (1 << 64) - 1
MAX_RUN_SEED = _MASK63


def check_run_seed(run_seed: int) -> None:
    """Seeds are integers in [0, 2**63 - 1]: every bit of them reaches the data order and the masks."""
    if isinstance(run_seed, bool) or not isinstance(run_seed, int) or not 0 <= run_seed <= MAX_RUN_SEED:
        raise ConfigError(f"train.seed must be an integer from 0 to 2**63 - 1, got {run_seed!r}: choose such a seed.")


def _high_seed_bits(run_seed: int) -> int:
    """63-bit mix (splitmix64's finaliser) of the run seed's bits above bit 15; 0 for seeds < 2**15.

    ``sample_seed`` once kept only 15 bits of the run seed, so 0 and 32768 gave the same run.
    XOR-ing this in separates them while every seed < 32768 keeps its published sample seeds
    (the finaliser maps 0 to 0 and is a bijection on 64 bits, so distinct high bits stay distinct).
    """
    z = (run_seed >> 15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """63-bit seed: 15 bits run seed, 16 bits epoch, 32 bits dataset index (unique within a run),
    XOR a mix of the run seed's higher bits (0 for run seeds < 32768)."""
    low = ((run_seed & 0x7FFF) << 48) | ((epoch & 0xFFFF) << 32) | (index & 0xFFFFFFFF)
    return low ^ _high_seed_bits(run_seed)


def permutation_seed(run_seed: int, epoch: int) -> int:
    """Seed of an epoch's shuffle: ``run_seed * 100003 + epoch`` as always, XOR the high-bit mix.

    The CPU generator keeps the low 32 bits; the mix brings every bit of a large seed into them.
    """
    return ((run_seed * 100_003 + epoch) ^ _high_seed_bits(run_seed)) & _MASK64


def init_seed(run_seed: int) -> int:
    """``torch.manual_seed`` value for model initialisation: the seed itself below 2**32 (the
    generator keeps 32 bits), else a 32-bit hash of all its bits."""
    return run_seed if run_seed < 1 << 32 else generator_seed(run_seed)


def _lowbias32(x: int) -> int:
    """Python-int twin of :func:`mimkit.masking.hash32` (the tensor version costs ~40 us a call,
    once per sample here)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def generator_seed(seed: int) -> int:
    """Fold a 63-bit sample seed into 32 bits for ``torch.manual_seed``.

    PyTorch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so passing
    ``sample_seed`` directly would drop the epoch and give every epoch the same augmentation.
    Equals ``hash32(hash32(seed & 0xFFFFFFFF) ^ (seed >> 32))`` on tensors.
    """
    return _lowbias32(_lowbias32(seed) ^ (seed >> 32))


class SeededSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch); rank r takes positions r, r+W, r+2W, ...

    Yields ``(dataset_index, sample_seed)`` pairs. The permutation is truncated to a multiple of
    the world size so every rank has the same number of samples (like DistributedSampler with
    drop_last); call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(permutation_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        order = order[: len(self) * self.world_size][self.rank :: self.world_size]
        for index in order:
            yield index, sample_seed(self.seed, self.epoch, index)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed torch's CPU, numpy's and Python's global generators from a sample seed.

    Augmentations draw from all three (torchvision from torch, timm's RandAugment op choice from
    numpy, RandomErasing from Python's ``random``); any one left unseeded makes a run unrepeatable.
    torch's CPU state is restored afterwards (the loop's dropout draws from it); numpy's and
    Python's are left as the sample seeded them, a function of the data order, so runs stay
    repeatable. Only the CPU generator is touched: ``torch.manual_seed`` would also queue a CUDA
    reseed and costs ~120 us a call, the whole of this ~10 us.
    """
    g = generator_seed(seed)
    np.random.seed(g)
    random.seed(g)
    cpu = torch.default_generator
    state = cpu.get_state()
    cpu.manual_seed(g)
    try:
        yield
    finally:
        cpu.set_state(state)


class SeededTransformDataset(Dataset):
    """``(index, seed)`` from :class:`SeededSampler` -> ``(view, label, seed, failed_paths)``.

    ``transform`` runs under the sample's own RNG seeds (:func:`seeded_rngs`; the global generators
    are restored, so seeding disturbs nothing else). It takes the image ``dataset[index][0]``, or,
    when it has ``reads_files = True`` (:class:`~mimkit.data.lazy.PretrainCrop`), ``(dataset,
    index)`` so it can open the file itself. A dataset with ``readable`` (lazy folders) may replace
    an unreadable file by another under its ``on_error=skip`` policy; ``failed_paths`` names the
    files that failed on the way, one per line ("" when none), so the loop can count them.
    """

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform
        self.reads_files = getattr(transform, "reads_files", False)

    def __len__(self) -> int:
        return len(self.dataset)

    def _view(self, index: int, seed: int):
        if self.reads_files:
            with seeded_rngs(seed):
                return self.transform(self.dataset, index), int(self.dataset.labels[index])
        image, label = self.dataset[index]
        with seeded_rngs(seed):
            return self.transform(image), label

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        if hasattr(self.dataset, "readable"):
            (view, label), _, failed = self.dataset.readable(index, lambda j: self._view(j, seed))
            return view, label, seed, "\n".join(failed)
        view, label = self._view(index, seed)
        return view, label, seed, ""
