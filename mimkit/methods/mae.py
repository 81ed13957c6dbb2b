"""MAE: masked autoencoder with a visible-token encoder and a light decoder (methods.md §2).

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022. The encoder sees
only the K = int(L(1-r)) visible patches; the decoder gets the encoded tokens plus L-K copies
of a learned mask token, restores patch order, adds fixed sin-cos positions and predicts the
pixels of every patch; the loss is the mean squared error on masked patches only, against
per-patch normalised pixels when ``norm_pix_loss``.

``MAE`` inherits the encoder so parameter names and shapes are exactly those of the official
models (``mae_pretrain_vit_*.pth``, ``*_full.pth``, ``mae_visualize_*.pth`` load strictly).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.masking import MaskDraw, random_masking, sample_uniform
from mimkit.methods.base import StepOutput
from mimkit.models.patches import patchify
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import MaskedViT, init_linear_and_norm


class Reconstruction(NamedTuple):
    """loss: scalar; pred: [N, L, p*p*C] in target space; mask: [N, L] (1 = masked);
    per_patch_error: [N, L] mean squared error of every patch (also visible ones)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    per_patch_error: torch.Tensor


def normalized_pixel_target(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C]; per patch (t - mean) / sqrt(var + 1e-6), unbiased var (official)."""
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


class MAE(MaskedViT):
    """Masked autoencoder.

    Args (beyond :class:`MaskedViT`'s):
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder size (official: 512, 8, 16).
        mask_ratio: fraction of patches removed, in (0, 1).
        norm_pix_loss: regress per-patch normalised pixels (official recipe for representations).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_embed_dim, self.grid_size, cls_token=True), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    @property
    def encoder(self) -> MaskedViT:
        """The part evaluated downstream; MAE *is* its encoder plus decoder attributes."""
        return self

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token", "decoder_pos_embed"}

    def draw_mask(self, batch_size: int, device, sample_seeds: torch.Tensor | None = None, noise=None) -> MaskDraw:
        """Random mask; per-sample seeded when ``sample_seeds`` [N] is given (see mimkit.masking)."""
        if noise is None and sample_seeds is not None:
            noise = sample_uniform(sample_seeds.to(device), self.num_patches)
        return random_masking(batch_size, self.num_patches, self.mask_ratio, noise=noise, device=device)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D] (encoder output, [CLS] first), ids_restore [N, L] -> pred [N, L, p*p*C]."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def reconstruct(
        self, images: torch.Tensor, *, noise: torch.Tensor | None = None, sample_seeds: torch.Tensor | None = None
    ) -> Reconstruction:
        """Full MAE pass. images [N, C, H, W]; noise [N, L] optional (small = keep)."""
        draw = self.draw_mask(images.shape[0], images.device, sample_seeds=sample_seeds, noise=noise)
        latent = self.encode(images, ids_keep=draw.ids_keep).tokens
        pred = self.decode(latent, draw.ids_restore)
        target = normalized_pixel_target(images, self.patch_size, self.norm_pix_loss)
        # The loss is computed in fp32 even under autocast: it is a reduction over many terms.
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
        mask = draw.mask.to(per_patch.dtype)
        loss = (per_patch * mask).sum() / mask.sum()
        return Reconstruction(loss, pred, draw.mask, per_patch)

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> StepOutput:
        rec = self.reconstruct(images, sample_seeds=sample_seeds)
        return StepOutput(rec.loss, {"loss": rec.loss.detach()})
