"""The ViT family: an encoder built from timm layers, with the two masked forwards every MIM
method needs, implementing the encoder contract of :mod:`mimkit.models.encoder`.

Parameter names equal timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.*``, ``norm``), so what mimkit saves loads in plain timm and
official MAE encoder checkpoints load here without renaming.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.models.encoder import EncoderOutput, require_cls_token
from mimkit.models.pos_embed import interpolate_pos_embed, sincos_2d


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention [N, heads, T, T] of a timm ``Attention`` module on normalised input x [N, T, D].

    Recomputed from the module's own qkv weights so the block itself keeps its fused
    (scaled_dot_product_attention) path; only requested blocks pay for this.
    """
    n, t, _ = x.shape
    qkv = attn.qkv(x).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _resolve_indices(request: bool | Sequence[int] | None, depth: int) -> set[int]:
    if request is None or request is False:
        return set()
    if request is True:
        return set(range(depth))
    return {i % depth for i in request}  # negative indices count from the last block


class MaskedViT(nn.Module):
    """Pre-norm ViT (methods.md §0.1) with a visible-token path and a boolean-mask path.

    The ViT family of the encoder contract (:mod:`mimkit.models.encoder`): a [CLS] token, global
    attention, ``feature_dim = output width = embed_dim``, ``output_stride = patch_size``.

    Args:
        img_size, patch_size, in_chans: input geometry; any channel count.
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        use_mask_token: add a learned ``masked_embed`` [1, 1, D] that replaces masked patch
            embeddings on the boolean-mask path (SimMIM / iBOT family).
        learnable_pos_embed: the fixed sin-cos table becomes a trainable parameter (fine-tuning).
    """

    family = "vit"
    has_cls_token = True
    has_global_attention = True
    default_pool = "cls"
    state_prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "masked_embed")

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = False,
        learnable_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.feature_dim, self.output_stride, self.mlp_ratio = embed_dim, patch_size, mlp_ratio
        # strict_img_size=False: multi-crop methods (iBOT) also encode smaller crops.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, self.grid_size, cls_token=True), requires_grad=learnable_pos_embed
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as timm
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.masked_embed = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self._init_encoder_weights()

    # -- initialisation (official MAE) ---------------------------------------------------------
    def _init_encoder_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # conv initialised like a Linear
        nn.init.normal_(self.cls_token, std=0.02)
        if self.masked_embed is not None:
            nn.init.normal_(self.masked_embed, std=0.02)
        self.blocks.apply(init_linear_and_norm)
        self.norm.apply(init_linear_and_norm)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that never get weight decay (timm convention)."""
        return {"pos_embed", "cls_token", "masked_embed"}

    # -- forward -------------------------------------------------------------------------------
    def position_table(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """[1, 1+h*w, D] position embedding for a (h, w) patch grid.

        The model's own table for its own grid; for other crop sizes (iBOT local crops) the
        table resampled bicubically to the new grid (DINO/iBOT ``interpolate_pos_encoding``),
        so a crop's patches span the same position range as a full image.
        """
        if tuple(grid_size) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid_size), list(self.grid_size), num_prefix_tokens=1)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> patch tokens with position embedding [N, L, D] (no [CLS])."""
        if images.shape[1] != self.in_chans:
            raise ValueError(f"model expects {self.in_chans} input channels, got {images.shape[1]}")
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by patch size {self.patch_size}")
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.patch_embed(images) + self.position_table(grid)[:, 1:, :]

    def encode(
        self,
        images: torch.Tensor,
        *,
        ids_keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_blocks: bool | Sequence[int] | None = None,
        return_attention: bool | Sequence[int] | None = None,
    ) -> EncoderOutput:
        """Encode images, optionally masked.

        images:   [N, C, H, W].
        ids_keep: [N, K] long; only these patches are computed (MAE family, static shapes).
        mask:     [N, L] bool/0-1; masked patches are replaced by ``masked_embed`` (SimMIM/iBOT).
        return_blocks / return_attention: True for all blocks or a list of block indices.
        """
        x = self.embed_patches(images)
        if ids_keep is not None and mask is not None:
            raise ValueError("pass either ids_keep or mask, not both")
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        elif mask is not None:
            if self.masked_embed is None:
                raise ValueError("this encoder was built without a mask token; create it with use_mask_token=True")
            # The mask token replaces the patch embedding, then gets the position embedding back.
            w = mask.unsqueeze(-1).to(x.dtype)
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
            x = x * (1 - w) + (self.masked_embed + self.position_table(grid)[:, 1:, :]) * w
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)

        want_blocks = _resolve_indices(return_blocks, self.depth)
        want_attn = _resolve_indices(return_attention, self.depth)
        out = EncoderOutput(tokens=x)
        for i, blk in enumerate(self.blocks):
            if i in want_attn:
                out.attentions[i] = attention_probs(blk.attn, blk.norm1(x))
            x = blk(x)
            if i in want_blocks:
                out.blocks[i] = x
        out.tokens = self.norm(x)
        if ids_keep is None:  # the full grid: the patch tokens as a map (SimMIM's decoder input)
            h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            out.feature_map = out.tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return out

    # -- the contract's pooled features, rebuilding and weight adaptation ------------------------
    def pooled_features(self, images: torch.Tensor, *, pool: str = "cls", final_norm: bool = True,
                        n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
        """One feature per image, [N, D * (n_last_blocks + avgpool)].

        n_last_blocks == 1: the [CLS] token ("cls") or mean patch token ("mean") of the last block,
        after the final norm (``final_norm``) or before it. n_last_blocks > 1 (DINO linear probe):
        the [CLS] tokens of the last n blocks, each after the final norm, concatenated; ``avgpool``
        appends the mean patch token of the last block (after the norm).
        """
        if pool == "cls" or n_last_blocks > 1:
            require_cls_token(self, "[CLS] pooling")
        last = self.depth - 1
        if n_last_blocks == 1 and not avgpool:
            tokens = self.encode(images).tokens if final_norm else self.encode(images, return_blocks=[last]).blocks[last]
            return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
        wanted = list(range(self.depth - n_last_blocks, self.depth))
        out = self.encode(images, return_blocks=wanted)
        normed = [self.norm(out.blocks[i]) if final_norm else out.blocks[i] for i in wanted]
        parts = [t[:, 0] for t in normed]
        if avgpool:
            parts.append(normed[-1][:, 1:].mean(dim=1))
        return torch.cat(parts, dim=-1)

    def pooled_dim(self, n_last_blocks: int = 1, avgpool: bool = False) -> int:
        """Width of :meth:`pooled_features`: D per block, plus D for the mean patch token."""
        return self.embed_dim * (n_last_blocks + int(avgpool))

    def architecture(self) -> dict[str, Any]:
        """Arguments that rebuild this encoder (no weights, no training-only options)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping: stem = layer 0, block k = layer k+1, the rest (norm, heads) = depth+1.

        (timm's own ViT matcher merges the final norm into the last block; MAE/BEiT give it the head's layer.)
        """
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^masked_embed", blocks=[(r"^blocks\.(\d+)", None)])

    def adapt_state_dict(self, state: dict[str, torch.Tensor], log: Callable[[str], None] = print
                         ) -> dict[str, torch.Tensor]:
        """A ViT state dict made to fit this encoder: the position table interpolated (bicubic) to
        this patch grid (methods.md §0.11), the patch embedding adapted to this channel count with
        timm's ``adapt_input_conv`` (1 channel: summed; N: repeated and scaled by C_ckpt / N)."""
        state = dict(state)
        pos = state.get("pos_embed")
        if pos is not None:
            old = int(round((pos.shape[1] - 1) ** 0.5))
            if (old, old) != tuple(self.grid_size):  # the grid decides, not the row count
                log(f"position table interpolated (bicubic) from a {old}x{old} to a "
                    f"{self.grid_size[0]}x{self.grid_size[1]} patch grid")
                state["pos_embed"] = interpolate_pos_embed(pos, self.grid_size)
        weight = state.get("patch_embed.proj.weight")
        if weight is not None and weight.shape[1] != self.in_chans:
            how = "summed over" if self.in_chans == 1 else f"repeated and scaled by {weight.shape[1]}/{self.in_chans} from"
            log(f"patch embedding adapted from {weight.shape[1]} to {self.in_chans} input channels "
                f"(kernel {how} the checkpoint's channels, timm adapt_input_conv)")
            state["patch_embed.proj.weight"] = adapt_input_conv(self.in_chans, weight, base_chans=weight.shape[1])
        if self.masked_embed is None:
            state.pop("masked_embed", None)
        return state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked features [N, 1+L, D] after the final norm."""
        return self.encode(images).tokens


def init_linear_and_norm(module: nn.Module) -> None:
    """Official MAE init: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = ["MaskedViT", "EncoderOutput", "attention_probs", "init_linear_and_norm"]  # EncoderOutput: encoder.py
