"""Official MAE layout, reference loss, and encoder paths."""

import math

import pytest
import torch
import torch.nn.functional as F

import mimkit
from mimkit.errors import ConfigError
from mimkit.loading import load_encoder
from mimkit.models.pos_embed import sincos_2d

OFFICIAL = {  # name: (D, depth, patch, decoder_depth) of facebookresearch/mae models_mae.py
    "mae_vit_base_patch16": (768, 12, 16, 8),
    "mae_vit_large_patch16": (1024, 24, 16, 8),
    "mae_vit_huge_patch14": (1280, 32, 14, 8),
}


def official_layout(dim, depth, patch, dec_depth, dec_dim=512, chans=3, img=224):
    """Names and shapes of the official MAE state dict, written out from methods.md §2.6."""
    n = (img // patch) ** 2
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, n + 1, dim), "mask_token": (1, 1, dec_dim),
              "decoder_pos_embed": (1, n + 1, dec_dim),
              "patch_embed.proj.weight": (dim, chans, patch, patch), "patch_embed.proj.bias": (dim,)}

    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}

    for i in range(depth):
        shapes.update(block(f"blocks.{i}", dim))
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,),
                   "decoder_embed.weight": (dec_dim, dim), "decoder_embed.bias": (dec_dim,)})
    for i in range(dec_depth):
        shapes.update(block(f"decoder_blocks.{i}", dec_dim))
    shapes.update({"decoder_norm.weight": (dec_dim,), "decoder_norm.bias": (dec_dim,),
                   "decoder_pred.weight": (patch * patch * chans, dec_dim), "decoder_pred.bias": (patch * patch * chans,)})
    return shapes


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_names_and_shapes(name):
    with torch.device("meta"):  # no memory for ViT-H
        model = mimkit.create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_layout(*OFFICIAL[name])


def test_official_layout_loads_strictly_and_encoder_only_file_too(tmp_path):
    model = mimkit.create_model("mae_vit_base_patch16")
    state = {k: torch.randn(s) for k, s in official_layout(*OFFICIAL["mae_vit_base_patch16"]).items()}
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    # mae_pretrain_vit_base.pth: {"model": encoder-only state dict}
    enc_state = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    torch.save({"model": enc_state}, tmp_path / "mae_pretrain_vit_base.pth")
    encoder, _ = load_encoder(tmp_path / "mae_pretrain_vit_base.pth", "mae_vit_base_patch16")
    assert torch.equal(encoder.norm.weight, state["norm.weight"])


def test_pos_embed_matches_formula():
    d, g = 16, 3
    table = sincos_2d(d, g)
    assert table.shape == (1, 1 + g * g, d)
    assert torch.all(table[0, 0] == 0)
    i, j = 1, 2  # row 1, column 2 -> patch index 5
    omega = [1.0 / 10000 ** (k / (d / 4)) for k in range(d // 4)]
    expected = ([math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
                + [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega])
    assert torch.allclose(table[0, 1 + i * g + j], torch.tensor(expected), atol=1e-6)


def reference_mae_loss(sd, images, noise, *, p, heads, dec_heads, depth, dec_depth, ratio, norm_pix):
    """Official MAE forward written out with functional ops on a state dict (independent of mimkit)."""

    def block(x, pre, nh):
        h = F.layer_norm(x, x.shape[-1:], sd[f"{pre}.norm1.weight"], sd[f"{pre}.norm1.bias"], 1e-6)
        b, t, d = h.shape
        qkv = F.linear(h, sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"]).reshape(b, t, 3, nh, d // nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // nh) ** -0.5).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(o, sd[f"{pre}.attn.proj.weight"], sd[f"{pre}.attn.proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], sd[f"{pre}.norm2.weight"], sd[f"{pre}.norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[f"{pre}.mlp.fc1.weight"], sd[f"{pre}.mlp.fc1.bias"])),
                     sd[f"{pre}.mlp.fc2.weight"], sd[f"{pre}.mlp.fc2.bias"])
        return x + h

    n, c, hh, ww = images.shape
    length = (hh // p) * (ww // p)
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([(sd["cls_token"] + sd["pos_embed"][:, :1]).expand(n, -1, -1), x], 1)
    for i in range(depth):
        x = block(x, f"blocks.{i}", heads)
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], 1e-6)
    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    tokens = torch.cat([x[:, 1:], sd["mask_token"].expand(n, length + 1 - x.shape[1], -1)], 1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], tokens], 1) + sd["decoder_pos_embed"]
    for i in range(dec_depth):
        x = block(x, f"decoder_blocks.{i}", dec_heads)
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], 1e-6)
    pred = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    target = images.reshape(n, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, length, p * p * c)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_official_algorithm(norm_pix):
    torch.manual_seed(0)
    kw = dict(depth=2, decoder_depth=2, norm_pix_loss=norm_pix, in_chans=3)
    model = mimkit.create_model("mae_vit_tiny_patch4", **kw)
    images = torch.randn(4, 3, 28, 28)
    noise = torch.rand(4, 49)
    rec = model.reconstruct(images, noise=noise)
    ref, ref_mask = reference_mae_loss(model.state_dict(), images, noise, p=4, heads=3, dec_heads=2, depth=2,
                                       dec_depth=2, ratio=0.75, norm_pix=norm_pix)
    assert torch.equal(rec.mask, ref_mask)
    assert torch.allclose(rec.loss, ref, rtol=1e-5, atol=1e-6)


def test_encoder_paths_agree():
    torch.manual_seed(0)
    enc = mimkit.create_model("vit_tiny_patch4", depth=2, use_mask_token=True, in_chans=7)
    x = torch.randn(2, 7, 28, 28)
    full = enc.encode(x, return_blocks=True, return_attention=[-1])
    assert full.tokens.shape == (2, 50, 192) and set(full.blocks) == {0, 1}
    attn = full.attentions[1]
    assert attn.shape == (2, 3, 50, 50) and torch.allclose(attn.sum(-1), torch.ones(2, 3, 50), atol=1e-5)
    ids_all = torch.arange(49).expand(2, -1)
    assert torch.allclose(enc.encode(x, ids_keep=ids_all).tokens, full.tokens, atol=1e-5)
    no_mask = torch.zeros(2, 49, dtype=torch.bool)
    assert torch.allclose(enc.encode(x, mask=no_mask).tokens, full.tokens, atol=1e-5)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, :10] = True
    assert not torch.allclose(enc.encode(x, mask=mask).tokens, full.tokens, atol=1e-3)
    with pytest.raises(ValueError, match="channels"):
        enc.encode(torch.randn(1, 3, 28, 28))


def test_create_model_rejects_unknown_argument():
    with pytest.raises(ConfigError, match="no argument"):
        mimkit.create_model("mae_vit_tiny_patch4", decoder_width=3)
    with pytest.raises(ConfigError, match="Did you mean"):
        mimkit.create_model("mae_vit_base_patch15")
