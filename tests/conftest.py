import os
from pathlib import Path

import pytest
import torch

# Tests share two cores with whatever else runs; one thread keeps timings stable and results exact.
torch.set_num_threads(int(os.environ.get("MIMKIT_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "datasets"


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not found: the shared MedMNIST files must sit in ../shared/datasets")
    return path


@pytest.fixture
def breast() -> Path:
    return shared_file("breastmnist.npz")


@pytest.fixture
def blood() -> Path:
    return shared_file("bloodmnist.npz")


# A MAE small enough for CPU tests: 2 encoder blocks, 1 decoder block.
TINY_MAE = ["model.name=mae_vit_tiny_patch4", "model.depth=2", "model.decoder_depth=1", "model.norm_pix_loss=true"]
