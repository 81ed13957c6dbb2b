import pytest
import torch

from mimkit.masking import mask_from_scores, num_visible, random_masking, sample_uniform
from mimkit.models.patches import patchify, unpatchify


@pytest.mark.parametrize("n,length,ratio", [(1, 49, 0.75), (8, 196, 0.75), (5, 196, 0.8), (3, 16, 0.5)])
def test_random_masking_invariants(n, length, ratio):
    draw = random_masking(n, length, ratio)
    k = int(length * (1 - ratio))
    assert draw.ids_keep.shape == (n, k)
    assert draw.mask.shape == (n, length) and draw.ids_restore.shape == (n, length)
    # exactly K visible per sample, and the visible ones are those in ids_keep
    assert torch.all((draw.mask == 0).sum(1) == k)
    kept = torch.zeros(n, length).scatter_(1, draw.ids_keep, 1.0)
    assert torch.equal(kept, 1 - draw.mask)
    # ids_restore inverts the shuffle: ids_shuffle[ids_restore] = identity
    ids_shuffle = torch.argsort(draw.ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, draw.ids_restore), torch.arange(length).expand(n, -1))
    assert torch.equal(ids_shuffle[:, :k], draw.ids_keep)


def test_official_rounding_of_visible_count():
    assert num_visible(196, 0.75) == 49
    assert num_visible(196, 0.8) == 39
    assert num_visible(49, 0.75) == 12
    with pytest.raises(ValueError):
        num_visible(49, 1.0)


def test_noise_decides_mask_small_noise_kept():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    draw = random_masking(1, 4, 0.5, noise=noise)
    assert draw.ids_keep.tolist() == [[1, 3]]
    assert draw.mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_mask_from_scores_ties_are_deterministic():
    scores = torch.zeros(2, 6)
    draw = mask_from_scores(scores, 2)
    assert draw.ids_keep.tolist() == [[0, 1], [0, 1]]


def test_sample_uniform_depends_only_on_seed():
    seeds = torch.tensor([11, 22, 33, 44])
    full = sample_uniform(seeds, 49)
    part = sample_uniform(seeds[2:], 49)
    assert torch.equal(full[2:], part)
    assert not torch.equal(full[0], full[1])
    assert full.min() >= 0 and full.max() < 1
    assert not torch.equal(sample_uniform(seeds, 49, stream=1), full)
    big = sample_uniform(torch.arange(4000), 49)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.std().item() - 12**-0.5) < 0.01


def test_patchify_order_and_roundtrip():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    # patch (i=1, j=2) is index 1*3+2 = 5, flattened as (row, col, channel)
    assert torch.equal(p[0, 5], x[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(p, 4, (2, 3), 3), x)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 10, 10), 4)
