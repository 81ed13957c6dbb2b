"""Official SimMIM checkpoints: the Microsoft-layout Swin (pretrained and fine-tuned) and timm Swin state dicts
are detected and load key by key into a SwinEncoder read off their shapes; the BEiT-style ViT is refused."""

import re

import pytest
import torch

from mimkit.cli import main
from mimkit.errors import CheckpointError
from mimkit.loading import detect_format, load_encoder
from mimkit.models.swin import SwinEncoder
from tests.conftest import shared_file

# 32 px, patch 2: stage grids 16 (width 16, 1 head) and 8 (width 32, 2 heads), window 4, 2 + 2 blocks (the
# second of each stage is shifted, so it has an attention mask that records the image size).
TINY = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)


def scrambled_swin(seed=0, **overrides) -> SwinEncoder:
    """Random values for every parameter (norms and bias tables included), so a misplaced tensor shows."""
    torch.manual_seed(seed)
    enc = SwinEncoder(**{**TINY, **overrides}, use_mask_token=True).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    return enc


def microsoft_key(key: str) -> str:
    """timm name -> Microsoft name: the merging at the start of stage i + 1 is the end of stage i there."""
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)


def microsoft_state(enc: SwinEncoder, prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """``enc`` as the official code saves it: Microsoft names, its buffers (index, attention masks) persisted."""
    state = {prefix + microsoft_key(k): v for k, v in enc.state_dict().items()}
    state.update({prefix + k: b for k, b in enc.named_buffers()})
    return state


def simmim_pretrain_file(tmp_path, enc: SwinEncoder):
    """{"model": encoder.* + decoder.0.* (1x1 conv to stride^2 x 3 channels)} as SimMIM's main_simmim.py saves."""
    state = microsoft_state(enc)
    state["decoder.0.weight"] = torch.randn(enc.output_stride ** 2 * 3, enc.feature_dim, 1, 1)
    state["decoder.0.bias"] = torch.randn(enc.output_stride ** 2 * 3)
    path = tmp_path / "simmim_pretrain__swin_tiny.pth"
    torch.save({"model": state, "epoch": 799}, path)
    return path, state


def images(size=32, chans=3):
    return torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(1))


def test_microsoft_layout_lands_key_by_key_and_computes_the_same_features(tmp_path, capsys):
    source = scrambled_swin()
    path, saved = simmim_pretrain_file(tmp_path, source)
    assert detect_format(torch.load(path, weights_only=True)) == "simmim-swin"
    enc, stats = load_encoder(path)
    assert stats is None and isinstance(enc, SwinEncoder)
    assert (enc.img_size, enc.patch_size, enc.in_chans, enc.embed_dim, enc.depths, enc.num_heads, enc.window_size,
            enc.mlp_ratio, enc.version) == (32, 2, 3, 16, (2, 2), (1, 2), 4, 4.0, 1)
    assert "assumed" not in capsys.readouterr().out  # the attention masks recorded the image size
    loaded = enc.state_dict()
    # every saved weight sits on its mimkit key (decoder and buffers aside); nothing else is in the encoder
    weights = {k: v for k, v in saved.items() if not k.startswith("decoder.") and not k.endswith(
        ("relative_position_index", "attn_mask"))}
    expected = {re.sub(r"^encoder\.", "", k) for k in weights}
    expected = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
                for k in expected}
    assert set(loaded) == expected
    merging = saved["encoder.layers.0.downsample.reduction.weight"]  # Microsoft: the end of stage 0
    assert torch.equal(loaded["layers.1.downsample.reduction.weight"], merging)
    assert torch.equal(loaded["layers.1.downsample.norm.bias"], saved["encoder.layers.0.downsample.norm.bias"])
    assert torch.equal(loaded["mask_token"], saved["encoder.mask_token"])
    for key, value in loaded.items():
        assert torch.equal(value, source.state_dict()[key]), key
    x = images()
    with torch.no_grad():
        assert torch.allclose(enc.pooled_features(x), source.pooled_features(x), atol=1e-6)
        mask = torch.rand(2, enc.num_patches, generator=torch.Generator().manual_seed(2)) < 0.6
        assert torch.allclose(enc.encode(x, mask=mask).tokens, source.encode(x, mask=mask).tokens, atol=1e-6)


def test_finetuned_and_timm_layouts_load_too(tmp_path):
    source = scrambled_swin(seed=3)
    finetuned = microsoft_state(source, prefix="")
    del finetuned["mask_token"]
    finetuned["head.weight"], finetuned["head.bias"] = torch.randn(10, 32), torch.randn(10)
    # timm 1.x saves no buffers, so nothing records the image size: it is given
    timm_layout = {k: v for k, v in source.state_dict().items() if k != "mask_token"}
    timm_layout["head.fc.weight"], timm_layout["head.fc.bias"] = torch.randn(10, 32), torch.randn(10)
    x = images()
    for name, state, fmt, size in (("ft.pth", finetuned, "swin-finetuned", {}),
                                   ("timm.pth", timm_layout, "timm-swin", {"img_size": 32})):
        assert detect_format({"model": state}) == fmt
        torch.save({"model": state}, tmp_path / name)
        enc, _ = load_encoder(tmp_path / name, **size)
        assert enc.mask_token is None and (enc.depths, enc.num_heads, enc.window_size) == ((2, 2), (1, 2), 4)
        with torch.no_grad():
            assert torch.allclose(enc.pooled_features(x), source.pooled_features(x), atol=1e-6), name


def test_an_unrecorded_image_size_is_guessed_aloud_or_taken_from_the_preset(tmp_path, capsys):
    # window 4 at 16 px: grids 8 and 4, the last stage is one window (no shift, no mask) ...
    source = scrambled_swin(img_size=16, depths=(1, 1))
    state = {k: v for k, v in source.state_dict().items()}  # ... and no buffers at all
    torch.save(state, tmp_path / "bare.pth")
    enc, _ = load_encoder(tmp_path / "bare.pth")
    assert enc.img_size == 16  # window 4 x patch 2 x 2^(2 - 1): the last stage one window
    assert "img_size 16 assumed (the weights do not record it)" in capsys.readouterr().out
    enc, _ = load_encoder(tmp_path / "bare.pth", img_size=32)
    assert enc.img_size == 32 and "assumed" not in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="is not a Swin preset"):
        load_encoder(tmp_path / "bare.pth", "vit_tiny_patch4")
    # a preset of another window and size: the bias tables are resampled to it (SimMIM fine-tunes 192/6 at 224/7)
    enc, _ = load_encoder(tmp_path / "bare.pth", "swin_tiny_patch2_window7_28", verbose=True, embed_dim=16,
                          depths=[1, 1], num_heads=[1, 2])
    assert (enc.img_size, enc.window_size) == (28, 7)
    assert enc.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (13 * 13, 1)
    assert "relative position bias tables resampled" in capsys.readouterr().out


def test_official_simmim_vit_is_refused_in_one_sentence(tmp_path):
    state = {"encoder.cls_token": torch.zeros(1, 1, 8), "encoder.mask_token": torch.zeros(1, 1, 8),
             "encoder.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
             "encoder.rel_pos_bias.relative_position_bias_table": torch.zeros(52, 2),
             "encoder.blocks.0.attn.q_bias": torch.zeros(8), "encoder.blocks.0.attn.v_bias": torch.zeros(8),
             "encoder.blocks.0.gamma_1": torch.zeros(8), "decoder.0.weight": torch.zeros(768, 8, 1, 1)}
    finetuned = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    for name, obj in (("pre.pth", {"model": state}), ("ft.pth", {"model": finetuned})):
        assert detect_format(obj) == "simmim-vit"
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=r"official SimMIM ViT, a BEiT-style network .* does not implement"):
            load_encoder(tmp_path / name)


def test_mimkit_finetune_starts_from_an_official_simmim_swin(tmp_path, capsys):
    """The fine-tuning path (load_encoder -> the family's classifier) on 1-channel 28-px data."""
    source = scrambled_swin(img_size=28, window_size=7)  # grids 14, 7: window 7 divides both
    path, _ = simmim_pretrain_file(tmp_path, source)
    out = tmp_path / "ft"
    code = main(["finetune", "--checkpoint", str(path), "--data", str(shared_file("breastmnist.npz")),
                 f"output_dir={out}", "data.labels_per_class=8", "data.val_split=null", "train.epochs=1",
                 "train.warmup_epochs=0", "train.batch_size=8", "train.progress=false", "finetune.randaug=null"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "format simmim-swin" in text and "original Swin layout" in text and "from 3 to 1 input channels" in text
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["model_config"]["family"] == "swin" and ckpt["model_config"]["img_size"] == 28
    # the pretrained merging weights (Microsoft stage 0) reached the classifier's stage 1 before training
    assert ckpt["model"]["layers.1.downsample.reduction.weight"].shape == (32, 64)
