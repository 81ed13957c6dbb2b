"""Attention maps, rollout and the boolean mask generators of the iBOT family; multi-crop."""

import colorsys
import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
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


def _discard_reference(maps, ratio):
    """Brute force, one sample at a time: sort the T*T entries, zero the int(T*T*ratio) lowest,
    except [CLS]->[CLS] (flat index 0), which stays even when it is among them (vit-explain)."""
    out = maps.clone()
    t = maps.shape[-1]
    count = int(t * t * ratio)
    for i in range(maps.shape[0]):
        flat = out[i].reshape(-1)
        order = sorted(range(t * t), key=lambda j: flat[j].item())
        for j in order[:count]:
            if j != 0:
                flat[j] = 0.0
    return out


def _discard_global_threshold(maps, ratio):
    """A wrong variant: one threshold for the whole batch (the batch's N*count lowest entries)."""
    n, t, _ = maps.shape
    count = int(t * t * ratio)
    threshold = maps.flatten().kthvalue(n * count).values
    drop = maps <= threshold
    drop[:, 0, 0] = False
    return maps.masked_fill(drop, 0.0)


def test_head_fusion_and_discard_ratio():
    attn = _softmax_maps(2, 3, 5)
    assert torch.equal(fuse_heads(attn, "max"), attn.amax(1)) and torch.equal(fuse_heads(attn, "min"), attn.amin(1))
    assert torch.allclose(fuse_heads(attn, "mean"), attn.sum(1) / 3)
    with pytest.raises(ValueError, match="head fusion"):
        fuse_heads(attn, "median")

    # Three samples on very different scales: [0, 1], [100, 101] and [0, 1e-3]. [CLS]->[CLS] is
    # the largest entry of samples 0 and 1 and the lowest of sample 2 (there it must survive, and
    # only count - 1 entries are zeroed).
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 5, 5, generator=g, dtype=torch.float64)
    maps[1] += 100.0
    maps[2] *= 1e-3
    maps[0, 0, 0], maps[1, 0, 0], maps[2, 0, 0] = 1.0, 101.0, 1e-9
    before = maps.clone()
    for ratio in (0.5, 0.3, 0.04):  # int(25 r) = 12, 7, 1 entries per sample
        ref = _discard_reference(maps, ratio)
        kept = discard_lowest(maps, ratio)
        assert torch.equal(kept, ref), ratio
        assert torch.equal(maps, before)  # the caller's maps are not modified
        count = int(25 * ratio)
        assert [(kept[i] == 0).sum().item() for i in range(3)] == [count, count, count - 1]
        # The batch-wide threshold zeroes nearly all of sample 0 and none of sample 1: it must differ.
        wrong = _discard_global_threshold(maps, ratio)
        assert not torch.equal(wrong, ref), ratio
        assert (wrong[1] == 0).sum() == 0 and (ref[1] == 0).sum() == count
    # Each sample alone gives the same as inside the batch.
    alone = torch.cat([discard_lowest(maps[i:i + 1], 0.5) for i in range(3)])
    assert torch.equal(alone, discard_lowest(maps, 0.5))
    assert discard_lowest(maps, 0.0) is maps  # nothing to discard
    with pytest.raises(ValueError, match="discard ratio"):
        discard_lowest(maps, 1.0)


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


def _crop_flip(img, size, scale, hflip=True):
    """torchvision's RandomResizedCrop (bicubic, antialias, ratio 3/4-4/3) then a p=0.5 flip,
    drawing from the global generator in the same order as the transform does."""
    top, left, h, w = RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
    crop = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
    if hflip and torch.rand(1) < 0.5:
        crop = TF.horizontal_flip(crop)
    return crop, h * w / (img.shape[-2] * img.shape[-1])


def _unnormalise(crops, mean, std):
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return [c * s + m for c in crops]


def test_multicrop_shapes_and_wrong_channel_count():
    for channels, num_local in ((1, 3), (3, 0), (5, 2)):
        t = MultiCropTransform(channels, 28, 12, num_local, [0.5] * channels, [0.25] * channels)
        torch.manual_seed(0)
        crops = t(torch.rand(channels, 28, 28))
        assert [tuple(c.shape) for c in crops] == [(channels, 28, 28)] * 2 + [(channels, 12, 12)] * num_local
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"expects \[C=5, H, W\] images, got shape \(3, 28, 28\)"):
        t(torch.rand(3, 28, 28))
    assert torch.get_num_threads() == threads


def test_multicrop_crops_follow_the_configured_sizes_and_scales():
    """Without photometric steps the crops equal torchvision's RandomResizedCrop + flip with the
    configured size and scale per crop type, drawn in order from the same generator."""
    g_scale, l_scale = (0.4, 0.7), (0.05, 0.15)
    img = torch.rand(2, 32, 32)
    t = MultiCropTransform(2, 24, 10, 3, [0.0, 0.0], [1.0, 1.0], global_scale=g_scale, local_scale=l_scale,
                           photometric=False)
    fractions = {"global": [], "local": []}
    for seed in range(40):
        torch.manual_seed(seed)
        crops = t(img)
        torch.manual_seed(seed)
        ref = []
        for kind, size, scale in [("global", 24, g_scale)] * 2 + [("local", 10, l_scale)] * 3:
            crop, fraction = _crop_flip(img, size, scale)
            ref.append(crop)
            fractions[kind].append(fraction)
        for ours, theirs in zip(crops, ref):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # The boxes drawn cover the configured ranges (up to integer rounding of the box sides).
    assert min(fractions["global"]) >= 0.38 and max(fractions["global"]) <= 0.72
    assert min(fractions["global"]) < 0.45 and max(fractions["global"]) > 0.65
    assert min(fractions["local"]) >= 0.04 and max(fractions["local"]) <= 0.16
    assert max(fractions["local"]) < min(fractions["global"])


@pytest.mark.parametrize("channels", [2, 7])
def test_multicrop_other_channel_counts_get_only_crop_flip_and_blur(channels):
    """C not in (1, 3): crop + flip + blur (p 1.0 / 0.1 / 0.5, sigma 0.1 to max(0.5, 2 * size / 224))
    and nothing that changes intensities, checked against a twin built from those steps."""
    mean = [0.1 * k for k in range(channels)]
    std = [0.5 + 0.1 * k for k in range(channels)]
    img = torch.rand(channels, 32, 32)
    t = MultiCropTransform(channels, 64, 16, 2, mean, std)
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    for seed in range(12):
        torch.manual_seed(seed)
        crops = t(img)
        torch.manual_seed(seed)
        ref = []
        for size, scale, blur_p in [(64, (0.25, 1.0), 1.0), (64, (0.25, 1.0), 0.1)] + [(16, (0.05, 0.25), 0.5)] * 2:
            crop, _ = _crop_flip(img, size, scale)
            blurred = RandomGaussianBlur((0.1, max(0.5, 2.0 * size / 224)), blur_p)(crop.clamp(0, 1))
            ref.append((blurred - m) / s)
        for ours, theirs in zip(crops, ref):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _constant_crops(channels, value, seeds):
    """Un-normalised crops of a constant image, one value per crop (crop, flip and blur keep a
    constant image constant, so only intensity operations can move it)."""
    t = MultiCropTransform(channels, 16, 8, 1, [0.0] * channels, [1.0] * channels)
    img = torch.full((channels, 16, 16), value)
    values = []
    for seed in seeds:
        torch.manual_seed(seed)
        crops = t(img)
        assert all((c - c.flatten()[0]).abs().max() < 1e-5 for c in crops)  # still constant, channels alike
        values.append([c.flatten()[0].item() for c in crops])
    return torch.tensor(values)  # [seeds, 3]: global1, global2, local


def test_multicrop_intensity_jitter_only_for_one_and_three_channels():
    """Brightness factor ~ U(0.6, 1.4) with p 0.8 on 1- and 3-channel crops (contrast, saturation,
    hue and grayscale leave a grey constant alone); a 7-channel crop keeps its value exactly."""
    seeds = range(200)
    assert torch.allclose(_constant_crops(7, 0.5, seeds), torch.tensor(0.5), rtol=0, atol=1e-6)
    for channels in (1, 3):
        g1 = _constant_crops(channels, 0.5, seeds)[:, 0]  # global1: no solarisation
        assert g1.min() >= 0.3 - 1e-6 and g1.max() <= 0.7 + 1e-6  # 0.5 * [0.6, 1.4]
        assert g1.min() < 0.33 and g1.max() > 0.67  # the whole brightness range is used
        # (grayscale weights sum to 0.9999, so a grey 0.5 may become 0.49995: tolerance 2e-4)
        unchanged = ((g1 - 0.5).abs() < 2e-4).float().mean().item()
        assert 0.1 <= unchanged <= 0.3, unchanged  # jitter skipped with p 0.2 (0.145 with these seeds)


def test_multicrop_solarises_only_the_second_global_crop_of_one_and_three_channels():
    """A constant 0.8 becomes b = 0.8 * factor in [0.48, 1] after jitter; solarisation (threshold 0.5,
    p 0.2, second global crop only) maps it to 1 - b <= 0.5. Expected share below 0.45:
    0.2 * P(b > 0.55) = 0.2 * (0.2 + 0.8 * 0.7125 / 0.8) = 0.18."""
    seeds = range(200)
    assert torch.allclose(_constant_crops(7, 0.8, seeds), torch.tensor(0.8), rtol=0, atol=1e-6)
    for channels in (1, 3):
        values = _constant_crops(channels, 0.8, seeds)
        assert values[:, 0].min() >= 0.48 - 1e-6 and values[:, 2].min() >= 0.48 - 1e-6  # never solarised
        solarised = (values[:, 1] < 0.45).float().mean().item()
        assert 0.1 <= solarised <= 0.3, solarised  # 0.18 (1 channel) and 0.205 (3) with these seeds


def test_multicrop_grayscale_only_for_three_channels():
    """Grayscale (p 0.2) is the one step that makes R = G = B on a colourful image."""
    img = torch.rand(3, 16, 16)
    t = MultiCropTransform(3, 16, 8, 0, [0.0] * 3, [1.0] * 3)
    grey = 0
    for seed in range(100):
        torch.manual_seed(seed)
        g1 = t(img)[0]
        grey += bool((g1 - g1[:1]).abs().max() < 1e-6)
    assert 10 <= grey <= 30, grey
    # And colour jitter really moves a 3-channel crop away from the crop + flip + blur twin.
    torch.manual_seed(0)
    jittered = t(img)[0]
    torch.manual_seed(0)
    crop, _ = _crop_flip(img, 16, (0.25, 1.0))
    assert (jittered - RandomGaussianBlur((0.1, 0.5), 1.0)(crop.clamp(0, 1))).abs().max() > 0.05


def test_multicrop_hue_jitter_is_at_most_a_tenth_of_the_colour_circle():
    """On a constant colour only the hue jitter (0.1) turns the hue: brightness, contrast and
    saturation blend with black or grey, and crop, flip and blur keep the image constant."""
    colour = (0.6, 0.3, 0.2)
    hue_in = colorsys.rgb_to_hsv(*colour)[0]
    t = MultiCropTransform(3, 16, 8, 0, [0.0] * 3, [1.0] * 3)
    img = torch.tensor(colour).view(3, 1, 1).expand(3, 16, 16).contiguous()
    shifts = []
    for seed in range(200):
        torch.manual_seed(seed)
        g1 = t(img)[0]
        rgb = g1[:, 0, 0].tolist()
        assert (g1 - g1[:, :1, :1]).abs().max() < 1e-5  # still constant
        if max(rgb) - min(rgb) > 1e-3:  # not grayscaled
            shifts.append((colorsys.rgb_to_hsv(*rgb)[0] - hue_in + 0.5) % 1.0 - 0.5)
    shifts = torch.tensor(shifts)
    assert shifts.abs().max() <= 0.1 + 1e-4
    assert shifts.min() < -0.08 and shifts.max() > 0.08
    assert (shifts.abs() < 1e-4).float().mean() > 0.1  # jitter skipped with p 0.2


def test_multicrop_same_seed_same_crops_other_seed_other_crops():
    img = torch.rand(3, 28, 28)
    t = MultiCropTransform(3, 28, 12, 2, [0.5] * 3, [0.25] * 3)
    runs = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.setdefault(seed, []).append(t(img))
    assert all(torch.equal(a, b) for a, b in zip(*runs[0]))
    assert all(not torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


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
