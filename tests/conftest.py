import os
from pathlib import Path

import pytest
import torch

from mimkit.config import DataConfig
from mimkit.data import compute_channel_stats, load_dataset

# Tests share two cores with whatever else runs; one thread keeps timings stable and results exact.
torch.set_num_threads(int(os.environ.get("MIMKIT_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The folder of the shared MedMNIST files: ``../shared/datasets`` beside the repository.

    ``MIMKIT_SHARED_DATA=/some/folder`` points the tests elsewhere (e.g. at an empty folder, to
    check what a machine without the data does). Read on every call, so ``monkeypatch.setenv``
    works inside a test.
    """
    override = os.environ.get("MIMKIT_SHARED_DATA")
    return Path(override) if override else REPO.parent / "shared" / "datasets"


def in_ci() -> bool:
    """True when the environment variable CI is "true" or "1" (set by ``.ci/run``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def shared_file(name: str) -> Path:
    """Path of a shared data file; a missing file fails the test under CI and skips it elsewhere.

    On a laptop without the data the tests that need it skip with the reason below. Under CI
    (CI=true or CI=1) a missing file is a failure, so a CI machine without the data cannot pass
    by silently skipping half the suite.
    """
    path = shared_dir() / name
    if not path.is_file():
        reason = (f"shared data file {path} not found: the MedMNIST files must sit in ../shared/datasets "
                  f"beside the repository (or set MIMKIT_SHARED_DATA to their folder)")
        if in_ci():
            pytest.fail(f"{reason}; CI=true makes missing data a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
def breast() -> Path:
    return shared_file("breastmnist.npz")


@pytest.fixture
def blood() -> Path:
    return shared_file("bloodmnist.npz")


# A MAE small enough for CPU tests: 2 encoder blocks, 1 decoder block.
TINY_MAE = ["model.name=mae_vit_tiny_patch4", "model.depth=2", "model.decoder_depth=1", "model.norm_pix_loss=true"]


def breast_multicrop(model, count: int) -> list[torch.Tensor]:
    """``model``'s multi-crop views of the first ``count`` BreastMNIST train images, stacked per view
    as the engine's collate gives them: [global_1 [N, ...], global_2, local_1, ...]."""
    ds = load_dataset(shared_file("breastmnist.npz"), "train")
    mean, std = compute_channel_stats(ds)
    transform = model.pretrain_transform(28, mean, std, DataConfig())
    torch.manual_seed(1)
    per_image = [transform(ds[i][0]) for i in range(count)]
    return [torch.stack(views) for views in zip(*per_image)]
