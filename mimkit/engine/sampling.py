"""World-size-independent data order and per-sample randomness.

Every sample of every epoch gets a seed that depends only on (run seed, epoch, dataset index).
Its augmentation and its mask are drawn from that seed, and the global batch at step t is the
same set of samples for one process with batch 2B and for two processes with batch B. Hence a
torchrun run follows the single-process loss curve, and a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from mimkit.masking import hash32


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """63-bit seed: 15 bits run seed, 16 bits epoch, 32 bits dataset index (unique within a run)."""
    return ((run_seed & 0x7FFF) << 48) | ((epoch & 0xFFFF) << 32) | (index & 0xFFFFFFFF)


def generator_seed(seed: int) -> int:
    """Fold a 63-bit sample seed into 32 bits for ``torch.manual_seed``.

    PyTorch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so passing
    ``sample_seed`` directly would drop the epoch and give every epoch the same augmentation.
    """
    t = torch.tensor([seed], dtype=torch.int64)
    return int(hash32(hash32(t & 0xFFFFFFFF) ^ (t >> 32))[0])


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
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        order = order[: len(self) * self.world_size][self.rank :: self.world_size]
        for index in order:
            yield index, sample_seed(self.seed, self.epoch, index)


class SeededTransformDataset(Dataset):
    """Applies ``transform`` under the sample's own RNG seed; returns (image, label, seed).

    The global RNG is forked so seeding per sample does not disturb anything else.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed(seed))
            image = self.transform(image)
        return image, label, seed
