"""Attention maps, rollout and the boolean mask generators of the iBOT family; multi-crop."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mimkit.attention import attention_rollout, discard_lowest, fuse_heads, rollout_layer_indices
from mimkit.data.multicrop import MultiCropTransform, RandomGaussianBlur
from mimkit.masking import (
    MASK_STRATEGIES, attention_scores, attmask, block_mask, block_noise_size, mask_noise_size, sample_uniform,
    strategy_mask,
)


def _softmax_maps(n, heads, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, t, t, generator=g).mul(2).softmax(dim=-1)


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_every_generator_gives_the_requested_count_per_sample_with_static_shapes(strategy):
    grid, n = (7, 7), 6
    length = 49
    counts = torch.tensor([0, 1, 5, 12, 24, 48])
    noise = sample_uniform(torch.arange(n), mask_noise_size(strategy, length), stream=3)
    scores = torch.rand(n, length)
    mask = strategy_mask(strategy, counts, grid, noise, scores)
    assert mask.shape == (n, length) and mask.dtype == torch.bool
    expected = counts - torch.floor(counts * 0.1).long() if strategy == "attmask_hint" else counts
    assert torch.equal(mask.sum(dim=1), expected)
    # An int count works too and gives the same number for every sample.
    assert (strategy_mask(strategy, 10, grid, noise, scores).sum(dim=1) == (9 if strategy == "attmask_hint" else 10)).all()


def test_attmask_high_masks_exactly_the_most_attended_patches_of_a_hand_made_map():
    # 1 image, 2 heads, 4 patches: [CLS] attention per head chosen by hand.
    t = 5
    attn = torch.full((1, 2, t, t), 1.0 / t)
    attn[0, 0, 0] = torch.tensor([0.1, 0.40, 0.05, 0.30, 0.15])
    attn[0, 1, 0] = torch.tensor([0.1, 0.20, 0.05, 0.50, 0.15])
    scores = attention_scores({0: attn}, "raw", layer=0)  # head mean: [0.30, 0.05, 0.40, 0.15]
    assert torch.allclose(scores, torch.tensor([[0.30, 0.05, 0.40, 0.15]]))
    assert attmask(scores, 2, "high").tolist() == [[True, False, True, False]]
    assert attmask(scores, 2, "low").tolist() == [[False, True, False, True]]
    assert attmask(scores, 1, "high").tolist() == [[False, False, True, False]]


def test_attmask_hint_reveals_only_top_attended_patches_and_masks_the_rest_of_the_top():
    n, length, k = 8, 196, 60
    scores = torch.rand(n, length)
    noise = sample_uniform(torch.arange(n), length)
    high = attmask(scores, k, "high")
    hint = attmask(scores, k, "hint", noise=noise)
    revealed = high & ~hint
    assert (revealed.sum(1) == 6).all() and not (hint & ~high).any()  # floor(0.1 * 60) revealed, nothing new masked
    pool = attmask(scores, int(length * 0.1), "high")  # the 19 most-attended patches
    assert not (revealed & ~pool).any()
    assert not torch.equal(revealed[0], revealed[1])  # a random subset per image


def test_rollout_equals_a_hand_computation_on_two_layers():
    a1 = _softmax_maps(1, 2, 3, seed=1)
    a2 = _softmax_maps(1, 2, 3, seed=2)

    def step(a):  # mean over heads, residual (A + I) / 2, rows sum to 1; written out entry by entry
        fused = [[(a[0, 0, i, j] + a[0, 1, i, j]).item() / 2 for j in range(3)] for i in range(3)]
        res = [[(fused[i][j] + (1.0 if i == j else 0.0)) / 2 for j in range(3)] for i in range(3)]
        return [[res[i][j] / sum(res[i]) for j in range(3)] for i in range(3)]

    s1, s2 = step(a1), step(a2)
    hand = [[sum(s2[i][m] * s1[m][j] for m in range(3)) for j in range(3)] for i in range(3)]  # later layer on the left
    wrong_order = [[sum(s1[i][m] * s2[m][j] for m in range(3)) for j in range(3)] for i in range(3)]
    rollout = attention_rollout([a1, a2])
    assert torch.allclose(rollout[0], torch.tensor(hand), atol=1e-6)
    assert not torch.allclose(rollout[0], torch.tensor(wrong_order), atol=1e-4)
    assert torch.allclose(rollout.sum(-1), torch.ones(1, 3))
    # The mask score is the [CLS] row over the patches.
    assert torch.allclose(attention_scores({0: a1, 1: a2}, "rollout_all"), torch.tensor([hand[0][1:]]), atol=1e-6)


def test_head_fusion_and_discard_ratio():
    attn = _softmax_maps(2, 3, 5)
    assert torch.equal(fuse_heads(attn, "max"), attn.amax(1)) and torch.equal(fuse_heads(attn, "min"), attn.amin(1))
    fused = fuse_heads(attn, "mean")
    fused[:, 0, 0] = 0.0  # the lowest entry, yet it must survive
    kept = discard_lowest(fused, 0.5)
    assert ((kept == 0).sum(dim=(1, 2)) == 12).all()  # int(25 * 0.5) = 12 discarded, [CLS]->[CLS] spared
    assert torch.equal(kept[:, 0, 0], fused[:, 0, 0])
    assert (kept[kept > 0] >= fused.flatten(1).kthvalue(13, dim=1).values.min()).all()
    with pytest.raises(ValueError, match="head fusion"):
        fuse_heads(attn, "median")


def test_log_and_power_scores_are_computed_per_image_and_stay_finite():
    attn = _softmax_maps(4, 3, 10)
    attn[2, :, 0, 3] = 0.0  # an underflowed entry (fp16) must not give -inf
    for source in ("log", "power"):
        batch = attention_scores({5: attn}, source, layer=5, power=0.5)
        alone = torch.cat([attention_scores({5: attn[i:i + 1]}, source, layer=5, power=0.5) for i in range(4)])
        assert torch.allclose(batch, alone) and torch.isfinite(batch).all()
    cls = attn[:, :, 0, 1:]
    assert torch.allclose(attention_scores({5: attn}, "power", layer=5, power=0.5), cls.sqrt().mean(1))
    assert torch.allclose(attention_scores({5: attn}, "log", layer=5)[0], cls[0].log().mean(0))


def test_rollout_layer_sets_generalise_the_seed_to_any_depth():
    assert rollout_layer_indices("all", 12) == list(range(12))
    assert rollout_layer_indices("last", 12) == [8, 9, 10, 11]
    assert rollout_layer_indices("middle", 12) == [4, 5, 6, 7]
    assert rollout_layer_indices("last", 2) == [1] and rollout_layer_indices([-1, 0], 6) == [0, 5]
    attn = {i: _softmax_maps(2, 2, 5, seed=i) for i in range(12)}
    last = attention_scores(attn, "rollout_last")
    assert torch.allclose(last, attention_rollout([attn[i] for i in (8, 9, 10, 11)])[:, 0, 1:])
    with pytest.raises(ValueError, match="needs the attention of blocks"):
        attention_scores({11: attn[11]}, "rollout_middle", depth=12)


def test_block_masks_are_contiguous_and_seeded():
    n, grid = 64, (14, 14)
    seeds = torch.arange(n)
    block = block_mask(grid, 75, sample_uniform(seeds, block_noise_size(196), stream=1))
    rand = strategy_mask("random", 75, grid, sample_uniform(seeds, 196, stream=1))

    def masked_neighbours(mask):  # mean number of masked 4-neighbours of a masked patch
        m = mask.view(n, 1, *grid).float()
        nb = torch.nn.functional.conv2d(m, torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]), padding=1)
        return (nb * m).sum() / m.sum()

    assert masked_neighbours(block) > masked_neighbours(rand) + 1.0
    # Per-sample seeds: a sample's mask does not depend on the rest of the batch.
    alone = block_mask(grid, 75, sample_uniform(seeds[5:6], block_noise_size(196), stream=1))
    assert torch.equal(alone[0], block[5])


def test_multicrop_shapes_and_channel_rule():
    for channels in (1, 3, 5):
        t = MultiCropTransform(channels, 28, 12, 3, [0.5] * channels, [0.25] * channels)
        torch.manual_seed(0)
        crops = t(torch.rand(channels, 28, 28))
        assert [tuple(c.shape) for c in crops] == [(channels, 28, 28)] * 2 + [(channels, 12, 12)] * 3
        text = repr(t)
        assert ("hue" in text) == (channels == 3) and ("Solarize" in text) == (channels in (1, 3))
        assert ("ColorJitter" in text) == (channels in (1, 3))
    with pytest.raises(ValueError, match="expects"):
        t(torch.rand(3, 28, 28))


def test_fast_gaussian_blur_equals_torchvision():
    img = torch.rand(3, 20, 20)
    blur = RandomGaussianBlur((0.9, 0.9), p=1.0)
    ref = TF.gaussian_blur(img, [2 * blur.radius + 1] * 2, [0.9, 0.9])
    assert torch.allclose(blur(img), ref, atol=1e-5)
    assert blur.radius == math.ceil(1.8)


def test_capture_attention_records_the_same_maps_without_recomputing():
    from mimkit.attention import capture_attention
    from mimkit.models.vit import MaskedViT

    torch.manual_seed(0)
    vit = MaskedViT(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=3, num_heads=3).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = vit.encode(x, return_attention=[0, 2])
        with capture_attention(vit, [0, -1]) as maps:
            tokens = vit.encode(x).tokens
    assert sorted(maps) == [0, 2] and torch.allclose(tokens, ref.tokens, atol=1e-5)
    assert all(torch.allclose(maps[i], ref.attentions[i], atol=1e-6) for i in (0, 2))
    assert all(b.attn.fused_attn == vit.blocks[1].attn.fused_attn for b in vit.blocks)  # fused path restored
