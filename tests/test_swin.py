"""The Swin family against timm: same names and numbers, mask token, blocks, layer decay, weight adaptation."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.optim import param_groups_layer_decay

from mimkit.errors import ConfigError
from mimkit.models.swin import PRESET_ARGS, SwinClassifier, SwinEncoder

# 32 px, patch 2: stage grids 16x16 (width 16) and 8x8 (width 32), window 4, 2 + 2 blocks.
TINY = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
TIMM = {1: SwinTransformer, 2: SwinTransformerV2}


def timm_swin(version, num_classes=0, **overrides):
    return TIMM[version](**{**TINY, **overrides}, num_classes=num_classes).eval()


def scramble(model, seed=0):
    """Random values for every parameter, so no zero init (V2's res-post-norm, the head) hides a wiring bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def images(n=2, chans=3, size=32, seed=1):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", [1, 2])
def test_timm_weights_load_both_ways_and_give_timm_features(version):
    ref = scramble(timm_swin(version))
    enc = SwinEncoder(**TINY, version=version, use_mask_token=True).eval()
    result = enc.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == ["mask_token"] and result.unexpected_keys == []
    timm_swin(version).load_state_dict({k: v for k, v in enc.state_dict().items() if k != "mask_token"}, strict=True)

    x = images()
    with torch.no_grad():
        expected = ref.forward_features(x)  # [N, 8, 8, 32], after the final norm
        torch.testing.assert_close(enc.pooled_features(x), expected.mean((1, 2)), atol=1e-5, rtol=0)
        torch.testing.assert_close(enc.encode(x).tokens, expected.flatten(1, 2), atol=1e-5, rtol=0)
        before_norm = ref.layers(ref.patch_embed(x)).mean((1, 2))
        torch.testing.assert_close(enc.pooled_features(x, final_norm=False), before_norm, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_classifier_state_dict_is_a_timm_classifier(version):
    clf = scramble(SwinClassifier(num_classes=5, **TINY, version=version)).eval()
    ref = timm_swin(version, num_classes=5)
    ref.load_state_dict(clf.state_dict(), strict=True)
    x, labels = images(), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(clf.logits(x), ref(x), atol=1e-5, rtol=0)
        step = clf(x, labels=labels)
        torch.testing.assert_close(step.loss, F.cross_entropy(ref(x), labels), atol=1e-5, rtol=0)
    assert set(step.metrics) == {"loss", "train_acc"} and clf.uses_labels
    with pytest.raises(ValueError, match="labels"):
        clf(x)


def test_mask_token_replaces_exactly_the_masked_patch_embeddings():
    enc = scramble(SwinEncoder(**TINY, use_mask_token=True)).eval()
    x = images()
    mask = torch.rand(2, 256, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        emb = enc.patch_embed(x)  # [2, 16, 16, 16] NHWC after the patch norm
        by_hand = emb.clone()
        by_hand[mask.reshape(2, 16, 16)] = enc.mask_token.reshape(-1)
        torch.testing.assert_close(enc.embed(x, mask), by_hand, atol=0, rtol=0)
        # ... and the stages run on that blended map
        expected = enc.norm(enc.layers(by_hand)).flatten(1, 2)
        torch.testing.assert_close(enc.encode(x, mask=mask).tokens, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(enc.encode(x, mask=mask).tokens, enc.encode(x).tokens)
        none_masked = torch.zeros(2, 256, dtype=torch.bool)
        torch.testing.assert_close(enc.encode(x, mask=none_masked).tokens, enc.encode(x).tokens, atol=0, rtol=0)
    with pytest.raises(ValueError, match="use_mask_token=True"):
        SwinEncoder(**TINY).encode(x, mask=mask)
    with pytest.raises(ValueError, match=r"\[2, 256\]"):
        enc.encode(x, mask=mask[:, :64])


def test_blocks_per_stage_feature_map_and_last_blocks_pooling():
    enc = scramble(SwinEncoder(**TINY)).eval()
    x = images()
    with torch.no_grad():
        out = enc.encode(x, return_blocks=True)
        assert {i: tuple(t.shape) for i, t in out.blocks.items()} == {
            0: (2, 256, 16), 1: (2, 256, 16), 2: (2, 64, 32), 3: (2, 64, 32)}
        assert tuple(out.feature_map.shape) == (2, 32, 8, 8)
        torch.testing.assert_close(out.feature_map, out.tokens.transpose(1, 2).reshape(2, 32, 8, 8), atol=0, rtol=0)
        torch.testing.assert_close(enc.norm(out.blocks[3]), out.tokens, atol=0, rtol=0)  # blocks are pre-norm
        assert set(enc.encode(x, return_blocks=[-1, 0]).blocks) == {0, 3}
        # the last two blocks, each through the final norm, mean-pooled and concatenated in order
        two = enc.pooled_features(x, n_last_blocks=2)
        expected = torch.cat([enc.norm(out.blocks[2]).mean(1), enc.norm(out.blocks[3]).mean(1)], dim=-1)
        torch.testing.assert_close(two, expected, atol=0, rtol=0)
    assert two.shape[1] == enc.pooled_dim(n_last_blocks=2) == 2 * enc.feature_dim == 64
    assert (enc.depth, enc.output_stride, enc.grid_size, enc.num_patches) == (4, 4, (16, 16), 256)
    with pytest.raises(ValueError, match="out of range"):
        enc.encode(x, return_blocks=[4])
    with pytest.raises(ConfigError, match="global attention"):
        enc.encode(x, return_attention=True)
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        enc.pooled_features(x, pool="cls")
    with pytest.raises(ConfigError, match="between 1 and 2"):
        enc.pooled_dim(n_last_blocks=3)
    with pytest.raises(ConfigError, match="avgpool"):
        enc.pooled_features(x, avgpool=True)


def _lr_and_wd(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("version", [1, 2])
def test_layer_decay_groups_equal_timms_one_layer_per_block(version):
    clf = SwinClassifier(num_classes=5, layer_decay=0.5, **TINY, version=version)
    ref = timm_swin(version, num_classes=5)
    ours = _lr_and_wd(clf, clf.optimizer_param_groups(0.05))
    theirs = _lr_and_wd(ref, param_groups_layer_decay(ref, 0.05, no_weight_decay_list=tuple(ref.no_weight_decay()),
                                                      layer_decay=0.5))
    assert ours == theirs
    block_scales = [ours[f"layers.{s}.blocks.{b}.norm1.weight"][0] for s in range(2) for b in range(2)]
    assert block_scales == [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5]  # each block its own layer, in order
    assert ours["patch_embed.proj.weight"][0] == 0.5 ** 5 and ours["head.fc.weight"] == (1.0, 0.05)
    assert ours["layers.1.downsample.reduction.weight"][0] == block_scales[2]  # merging joins its stage's first block
    assert ours["norm.weight"][0] == block_scales[3]  # the final norm joins the last block
    # the encoder's mask token is stem and never decayed
    enc = SwinEncoder(**TINY, use_mask_token=True, version=version)
    enc_groups = _lr_and_wd(enc, param_groups_layer_decay(enc, 0.05, no_weight_decay_list=tuple(enc.no_weight_decay()),
                                                          layer_decay=0.5))
    assert enc_groups["mask_token"] == (enc_groups["patch_embed.proj.bias"][0], 0.0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolator warns about its own indexing
def test_adapt_window_7_to_4_resamples_bias_tables_like_timm():
    small = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    source = scramble(SwinEncoder(img_size=28, window_size=7, **small))  # stage grids 14, 7
    target = SwinEncoder(img_size=16, window_size=4, **small).eval()  # stage grids 8, 4
    logs = []
    adapted = target.adapt_state_dict(source.state_dict(), log=logs.append)
    target.load_state_dict(adapted, strict=True)
    assert logs == ["relative position bias tables resampled (timm resize_rel_pos_bias_table): window 7 -> 4 (4 blocks)"]
    assert adapted["layers.1.blocks.1.attn.relative_position_bias_table"].shape == (49, 4)
    # timm's own resize of the same weights gives the same model
    ref = SwinTransformer(img_size=28, window_size=7, **small, num_classes=0)
    ref.load_state_dict(source.state_dict(), strict=True)
    ref.set_input_size(img_size=(16, 16), window_size=4)
    ref.eval()
    x = images(size=16)
    with torch.no_grad():
        torch.testing.assert_close(target.pooled_features(x), ref.forward_features(x).mean((1, 2)), atol=1e-5, rtol=0)


def test_adapt_channels_buffers_and_original_layout():
    source = scramble(SwinEncoder(**TINY))
    state = source.state_dict()
    logs = []
    grey = SwinEncoder(**{**TINY, "in_chans": 1})
    adapted = grey.adapt_state_dict(state, log=logs.append)
    grey.load_state_dict(adapted, strict=True)
    torch.testing.assert_close(adapted["patch_embed.proj.weight"], state["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert logs == ["patch embedding adapted from 3 to 1 input channels (kernel summed over the checkpoint's "
                    "channels, timm adapt_input_conv)"]

    # an original-layout checkpoint (merging at the end of stage i, head without .fc, saved buffers)
    original = {k.replace("layers.1.downsample", "layers.0.downsample"): v for k, v in state.items()}
    original["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    logs.clear()
    restored = source.adapt_state_dict(original, log=logs.append)
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert len(logs) == 2 and "original Swin layout" in logs[0] and logs[1].startswith("2 relative-position index")


def test_seven_channels_and_rebuilding_from_architecture():
    enc = SwinEncoder(**{**TINY, "in_chans": 7})
    x = images(chans=7)
    out = enc.encode(x)
    assert tuple(out.tokens.shape) == (2, 64, 32) and tuple(out.feature_map.shape) == (2, 32, 8, 8)
    out.tokens.mean().backward()
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="7 input channels"):
        enc.encode(images())
    clf = SwinClassifier(num_classes=3, **enc.architecture())  # the fine-tuning path rebuilds from architecture()
    assert clf.logits(x).shape == (2, 3)
    assert {k: v.shape for k, v in SwinEncoder(**enc.architecture()).state_dict().items()} == \
        {k: v.shape for k, v in enc.state_dict().items()}


def test_geometry_errors_name_a_fix():
    with pytest.raises(ValueError, match="output stride 4"):
        SwinEncoder(**{**TINY, "img_size": 30})
    with pytest.raises(ValueError, match="e.g. 6"):  # grids 12, 6 at 24 px: window 7 fits neither
        SwinEncoder(**{**TINY, "img_size": 24, "window_size": 7})


TIMM_EQUIVALENT = {  # our preset -> the timm model (and overrides) with the same architecture
    "swin_tiny_patch4_window7_224": ("swin_tiny_patch4_window7_224", {}),
    "swin_small_patch4_window7_224": ("swin_small_patch4_window7_224", {}),
    "swin_base_patch4_window7_224": ("swin_base_patch4_window7_224", {}),
    "swin_base_patch4_window6_192": ("swin_base_patch4_window7_224", dict(img_size=192, window_size=6)),
    "swinv2_tiny_window7_224": ("swinv2_tiny_window8_256", dict(img_size=224, window_size=7)),
}


@pytest.mark.parametrize("name", sorted(TIMM_EQUIVALENT))
def test_presets_have_timms_architecture(name):
    import timm

    timm_name, overrides = TIMM_EQUIVALENT[name]
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        ours = SwinEncoder(**PRESET_ARGS[name][0])
        theirs = timm.create_model(timm_name, num_classes=0, **overrides)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_medmnist_preset_runs_on_28_px():
    enc = SwinEncoder(**PRESET_ARGS["swin_tiny_patch2_window7_28"][0], use_mask_token=True).eval()
    assert (enc.grid_size, enc.output_stride, enc.feature_dim) == ((14, 14), 4, 192)
    mask = torch.zeros(2, 196, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        out = enc.encode(images(size=28), mask=mask)
    assert tuple(out.feature_map.shape) == (2, 192, 7, 7)
