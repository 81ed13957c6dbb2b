"""SimMIM: masked image modeling with a mask-token encoder and a one-layer pixel head.

Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022 (methods.md §3:
DDMIM's reconstruction term and baseline). Coarse square cells of the image (32 px in the paper)
are masked at random (ratio 0.6); the encoder sees the whole grid, masked patch embeddings
replaced by a learned mask token; a 1x1 convolution maps the encoder's last feature map
[N, D, h', w'] (stride s pixels) to s^2 * C channels and PixelShuffle(s) rearranges them into
pixels [N, C, H, W]; the loss is the L1 error on the pixels of masked patches only:

    loss = sum_{n,c,y,x} m[n,y,x] |pred - x| / ((sum_{n,y,x} m[n,y,x] + 1e-5) * C)

SimMIM regresses the *normalised input pixels* (the per-channel dataset normalisation the data
pipeline applies), not per-patch normalised pixels as MAE's norm-pix targets: the paper's
choice, kept here.

:class:`SimMIM` works on any encoder of the contract (:mod:`mimkit.models.encoder`): it needs
``in_chans``, ``patch_size``, ``feature_dim``, ``output_stride``, ``no_weight_decay()`` and
``encode(images, mask=[N, L] bool)`` filling ``EncoderOutput.feature_map``. :class:`SimMIMViT`
and :class:`SimMIMSwin` are the presets' thin builders. Parameter names are ``encoder.*`` and
``decoder.0.*``, the official checkpoints' layout.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from mimkit.masking import simmim_mask, simmim_mask_geometry
from mimkit.methods.base import StepOutput
from mimkit.models.swin import PRESET_ARGS as SWIN_PRESET_ARGS, SwinEncoder
from mimkit.models.vit import MaskedViT

_CONTRACT = ("in_chans", "patch_size", "feature_dim", "output_stride", "encode")


class SimMIMReconstruction(NamedTuple):
    """loss: scalar; pred: [N, C, H, W] predicted normalised pixels (visible ones too);
    pixel_mask: [N, 1, H, W] float, 1 = pixel of a masked patch; mask: [N, L] bool patch mask."""

    loss: torch.Tensor
    pred: torch.Tensor
    pixel_mask: torch.Tensor
    mask: torch.Tensor


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: pred, target [N, C, H, W]; pixel_mask [N, 1, H, W] (1 = masked).

    Absolute errors of masked pixels summed over channels and pixels, divided by
    (masked pixels + 1e-5) * C: the mean error per masked pixel value. The 1e-5 keeps a batch
    without masked pixels at 0 instead of NaN. In fp32 even under autocast (a large reduction).
    """
    error = (pred.float() - target.float()).abs() * pixel_mask.float()
    return error.sum() / ((pixel_mask.float().sum() + 1e-5) * pred.shape[1])


def patch_mask_to_pixels(mask: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """[N, L] patch mask on a (h, w) grid -> [N, 1, h * p, w * p] float pixel mask."""
    m = mask.reshape(mask.shape[0], 1, *grid).float()
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class SimMIM(nn.Module):
    """SimMIM head and loss around any contract encoder (see the module docstring).

    Args:
        mask_patch_size: side in pixels of the square mask cells; a multiple of the encoder's
            patch size that divides the image (paper: 32).
        mask_ratio: fraction of mask cells masked per image, in (0, 1); ceil(cells * ratio)
            cells exactly (paper: 0.6).
    """

    def __init__(self, encoder: nn.Module, mask_patch_size: int = 32, mask_ratio: float = 0.6) -> None:
        super().__init__()
        missing = [a for a in _CONTRACT if not hasattr(encoder, a)]
        if missing:
            raise TypeError(f"SimMIM needs an encoder of the mimkit contract (mimkit.models.encoder), but this "
                            f"{type(encoder).__name__} lacks {', '.join(missing)}.")
        simmim_mask_geometry(encoder.grid_size, encoder.patch_size, mask_patch_size, mask_ratio)  # fail at build
        self.encoder = encoder
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.img_size, self.in_chans, self.patch_size = encoder.img_size, encoder.in_chans, encoder.patch_size
        stride = encoder.output_stride
        # One linear map per feature cell to its s x s x C pixels (the paper: a linear head does
        # no worse than heavier ones). PyTorch's default conv init, as the official decoder.
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.feature_dim, stride**2 * encoder.in_chans, kernel_size=1), nn.PixelShuffle(stride)
        )

    def eval_encoders(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def no_weight_decay(self) -> set[str]:
        """The encoder's no-decay names (tokens, position tables, relative-bias tables), prefixed."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def draw_mask(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L] bool SimMIM mask for images [N, C, H, W]; per-sample seeded when ``sample_seeds`` [N]."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        seeds = sample_seeds.to(images.device) if sample_seeds is not None else None
        return simmim_mask(seeds, images.shape[0], grid, self.patch_size, self.mask_patch_size, self.mask_ratio,
                           device=images.device)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W], mask [N, L] -> predicted pixels [N, C, H, W]."""
        features = self.encoder.encode(images, mask=mask).feature_map  # [N, D, H / s, W / s]
        if features is None:
            raise ValueError(f"this {type(self.encoder).__name__} returned no feature_map; SimMIM needs encoders "
                             f"that fill EncoderOutput.feature_map when the full grid is encoded.")
        pred = self.decoder(features)
        if pred.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"the decoder predicts {tuple(pred.shape[-2:])} pixels for {tuple(images.shape[-2:])}-px "
                             f"images: the image side must be a multiple of the output stride "
                             f"{self.encoder.output_stride}.")
        return pred

    def reconstruct(self, images: torch.Tensor, *, mask: torch.Tensor | None = None,
                    sample_seeds: torch.Tensor | None = None) -> SimMIMReconstruction:
        """Full SimMIM pass. images [N, C, H, W] (normalised: they are the target); mask [N, L]
        optional (True = masked), else drawn (seeded by ``sample_seeds`` [N] when given)."""
        if mask is None:
            mask = self.draw_mask(images, sample_seeds)
        mask = mask.bool()
        pred = self.predict(images, mask)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        pixel_mask = patch_mask_to_pixels(mask, grid, self.patch_size)
        return SimMIMReconstruction(masked_l1_loss(pred, images, pixel_mask), pred, pixel_mask, mask)

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> StepOutput:
        rec = self.reconstruct(images, sample_seeds=sample_seeds)
        return StepOutput(rec.loss, {"loss": rec.loss.detach()})


def init_vit_as_simmim(vit: MaskedViT) -> None:
    """The official SimMIM ViT initialisation (BEiT lineage) on a MaskedViT.

    Linear and patch-embedding conv weights trunc-normal(0.02) with zero biases, unit LayerNorms;
    block i's (from 1) attention output and second MLP weights divided by sqrt(2 i), so deeper
    residual branches start smaller; [CLS] trunc-normal(0.02); the mask token trunc-normal(0.02)
    cut at +-0.02. The position table stays mimkit's fixed sin-cos one (official SimMIM ViT-B:
    a shared relative position bias and layer scale 0.1 instead, which MaskedViT does not have).
    """
    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    vit.apply(init)
    with torch.no_grad():
        for i, block in enumerate(vit.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
    trunc_normal_(vit.cls_token, std=0.02)
    trunc_normal_(vit.masked_embed, std=0.02, a=-0.02, b=0.02)


class SimMIMViT(SimMIM):
    """SimMIM on mimkit's ViT (:class:`~mimkit.models.vit.MaskedViT` with a learned mask token).

    The encoder's feature map is its patch tokens after the final norm (stride = patch size), so
    the decoder maps each token to its own p x p x C pixels.

    Args:
        img_size: side of the square input images.
        patch_size: side of the ViT patches (the grid masks live on; also the output stride).
        in_chans: number of input channels (any count; the decoder predicts all of them).
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        drop_path_rate: stochastic depth, linear over blocks (official ViT-B recipe: 0.1).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
    ) -> None:
        encoder = MaskedViT(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                            use_mask_token=True)
        init_vit_as_simmim(encoder)
        super().__init__(encoder, mask_patch_size, mask_ratio)


class SimMIMSwin(SimMIM):
    """SimMIM on mimkit's Swin (:class:`~mimkit.models.swin.SwinEncoder` with a learned mask token).

    The decoder reads the last stage's map after the final norm (stride patch_size x 2^(stages-1),
    32 for the 4-stage Swins); timm's initialisation, mask token trunc-normal(0.02), as official.

    Args:
        img_size: side of the square input images; a multiple of the output stride.
        patch_size: side of the patches of the first stage (the grid masks live on).
        in_chans: number of input channels (any count; the decoder predicts all of them).
        embed_dim: width of the first stage; each later stage doubles it.
        depths: number of blocks per stage (its length is the number of stages).
        num_heads: attention heads per stage.
        window_size: side of the attention windows; it must divide every stage grid (or cover it).
        mlp_ratio: hidden width of each block's MLP relative to its stage width.
        drop_path_rate: stochastic depth, linear over all blocks (official Swin-B recipe: 0.0).
        version: 1 for Swin, 2 for Swin V2.
    """

    def __init__(
        self,
        img_size: int = 192,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        version: int = 1,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
    ) -> None:
        encoder = SwinEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                              depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                              drop_path_rate=drop_path_rate, use_mask_token=True, version=version)
        super().__init__(encoder, mask_patch_size, mask_ratio)


# -- presets: {name: (class, kwargs, description)}; registered by mimkit.registry ----------------
_VIT_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_VIT_TINY = dict(embed_dim=192, depth=12, num_heads=3)

PRESET_ARGS: dict[str, tuple[type[SimMIM], dict[str, Any], str]] = {
    # SimMIM paper and official simmim_pretrain__swin_base__img192_window6__{100,800}ep.yaml:
    # Swin-B at 192 px, window 6, drop path 0.0, 32-px mask cells (6x6 cells, 22 masked), ratio 0.6.
    "simmim_swin_base_patch4_window6_192": (
        SimMIMSwin, {**SWIN_PRESET_ARGS["swin_base_patch4_window6_192"][0], "drop_path_rate": 0.0,
                     "mask_patch_size": 32, "mask_ratio": 0.6},
        "SimMIM Swin-B, window 6, 192 px, 32-px mask cells at 0.6 (the paper's Swin-B pre-training)"),
    # Official simmim_pretrain__vit_base__img224__800ep.yaml: ViT-B/16 at 224 px, drop path 0.1,
    # 32-px mask cells (7x7 cells of 2x2 patches, 30 masked), ratio 0.6. Encoder: mimkit's ViT
    # (sin-cos positions, no layer scale), not the official BEiT-style ViT (relative position bias).
    "simmim_vit_base_patch16": (
        SimMIMViT, dict(img_size=224, patch_size=16, **_VIT_BASE, drop_path_rate=0.1, mask_patch_size=32,
                        mask_ratio=0.6),
        "SimMIM ViT-B/16, 224 px, 32-px mask cells at 0.6 (official ViT-B recipe, mimkit's ViT)"),
    # 28 px (MedMNIST), mimkit's choice: a 7x7 grid of 4-px patches has no 32-px cells; a cell size must
    # divide 28 and be a multiple of 4, and 4 is the only one short of the whole image (8 does not
    # divide 28), so each cell is one patch (= the output stride, as 32 is Swin-B's): 30 of 49 masked.
    # No drop path: a 5M-parameter model on a small dataset, as mimkit's MAE ViT-T/4 recipe.
    "simmim_vit_tiny_patch4": (
        SimMIMViT, dict(img_size=28, patch_size=4, **_VIT_TINY, drop_path_rate=0.0, mask_patch_size=4,
                        mask_ratio=0.6),
        "SimMIM ViT-T/4, 28 px, 4-px mask cells at 0.6 (MedMNIST)"),
    # 28 px on the Swin engineer's small Swin (patch 2, 2 stages, output stride 4): 4-px cells, i.e.
    # 2x2 model patches per cell and one cell per last-stage feature (as 32-px cells on Swin-B's
    # stride-32 map); 7x7 cells, 30 masked.
    "simmim_swin_tiny_28": (
        SimMIMSwin, {**SWIN_PRESET_ARGS["swin_tiny_patch2_window7_28"][0], "drop_path_rate": 0.0,
                     "mask_patch_size": 4, "mask_ratio": 0.6},
        "SimMIM small Swin (patch 2, window 7, 2 stages), 28 px, 4-px mask cells at 0.6 (MedMNIST)"),
}

__all__ = ["SimMIM", "SimMIMViT", "SimMIMSwin", "SimMIMReconstruction", "PRESET_ARGS", "masked_l1_loss",
           "patch_mask_to_pixels", "init_vit_as_simmim"]
