"""The Swin family: an encoder made of timm's Swin (V1 or V2) layers with a SimMIM mask token,
implementing the encoder contract of :mod:`mimkit.models.encoder`, and its fine-tuning classifier.

The encoder holds the ``patch_embed``, ``layers`` and ``norm`` modules of a timm
``SwinTransformer`` / ``SwinTransformerV2`` of the same configuration (built once, its head
dropped), so parameter names and numbers are timm's: a ``timm.create_model("swin_...",
num_classes=0)`` state dict loads here strictly (the mask token aside) and ours loads back into
timm. timm builds stages with the patch merging at the *start* of stage i > 0 (``layers.i.downsample``);
the original Microsoft layout (merging at the end of a stage) is converted by :meth:`adapt_state_dict`.

Shapes: images [N, C, H, W]; patch grid (h, w) = (H / patch, W / patch), L = h * w; stage s works on
an NHWC map [N, h / 2^s, w / 2^s, embed_dim * 2^s]; the last stage gives the tokens and feature map.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Sequence

import torch
from timm.layers import resample_patch_embed, resize_rel_pos_bias_table, trunc_normal_
from timm.models import adapt_input_conv
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from mimkit.errors import ConfigError
from mimkit.models.classifier import SupervisedClassifier
from mimkit.models.encoder import EncoderOutput, require_cls_token, require_global_attention

# Non-persistent buffers in timm 1.x that older timm / the Microsoft code saved: each model builds
# its own for its window and image size, so a checkpoint's copies are never used.
_BUFFER_NAMES = ("relative_position_index", "relative_coords_table", "attn_mask", "k_bias")
# Parameters timm exempts from weight decay, per Swin version (its no_weight_decay()).
_NO_DECAY_KEYS = {1: ("relative_position_bias_table",), 2: ("cpb_mlp", "logit_scale")}
_BIAS_TABLE = ".relative_position_bias_table"


def stage_grids(img_size: int, patch_size: int, num_stages: int) -> list[int]:
    """Side of each stage's token grid: img / patch, halved by every patch merging."""
    grid = img_size // patch_size
    return [grid >> s for s in range(num_stages)]


def check_geometry(img_size: int, patch_size: int, num_stages: int, window_size: int) -> None:
    """One-sentence ValueError unless the image tiles into every stage and the window fits each stage.

    A window "fits" a stage grid when it divides it, or covers it whole (timm then uses the grid as
    the one window, without shift).
    """
    stride = patch_size * 2 ** (num_stages - 1)
    if img_size % stride:
        raise ValueError(f"img_size {img_size} is not divisible by the output stride {stride} (patch {patch_size} "
                         f"x 2^{num_stages - 1} merges): choose a multiple of {stride}.")
    grids = stage_grids(img_size, patch_size, num_stages)
    bad = [g for g in grids if g > window_size and g % window_size]
    if bad:
        last = grids[-1]  # every earlier grid is a multiple of the last one, so its divisors fit all
        fits = [d for d in range(1, last + 1) if last % d == 0 and d <= window_size] or [last]
        raise ValueError(f"window_size {window_size} does not divide the {bad[0]}x{bad[0]} stage grid (stage grids "
                         f"{grids} at img_size {img_size}): choose a window that divides them all, e.g. {fits[-1]}.")


def _resolve_blocks(request: bool | Sequence[int] | None, depth: int) -> set[int]:
    """Block indices asked for: None/False = none, True = all, a list (negative = from the end)."""
    if request is None or request is False:
        return set()
    if request is True:
        return set(range(depth))
    out = set()
    for i in request:
        if not -depth <= i < depth:
            raise ValueError(f"block index {i} is out of range for an encoder of {depth} blocks")
        out.add(i % depth)
    return out


class SwinEncoder(nn.Module):
    """Swin Transformer (V1 or V2) encoder with a SimMIM mask token; the Swin family of the contract.

    No [CLS] token, windowed attention, ``feature_dim`` = the last stage's width,
    ``output_stride = patch_size * 2^(stages - 1)``. Initialisation is timm's (trunc-normal 0.02
    Linear weights; V2 also zeroes the res-post-norm weights); the mask token is trunc-normal 0.02.

    Args:
        img_size: side of the square input images; a multiple of the output stride.
        patch_size: side of the patches of the first stage (the grid masks live on).
        in_chans: number of input channels (any count).
        embed_dim: width of the first stage; each later stage doubles it.
        depths: number of blocks per stage (its length is the number of stages).
        num_heads: attention heads per stage.
        window_size: side of the attention windows; it must divide every stage grid (or cover it).
        mlp_ratio: hidden width of each block's MLP relative to its stage width.
        drop_path_rate: stochastic depth, increasing linearly over all blocks (timm).
        use_mask_token: add a learned ``mask_token`` [1, 1, embed_dim] that replaces masked patch
            embeddings (SimMIM).
        version: 1 for Swin (relative position bias tables), 2 for Swin V2 (cosine attention,
            continuous position bias, res-post-norm).
    """

    family = "swin"
    default_pool = "mean"
    state_prefixes = ("patch_embed.", "layers.", "norm.", "mask_token")
    has_cls_token = False
    has_global_attention = False

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = False,
        version: int = 1,
    ) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (Swin) or 2 (Swin V2), got {version!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} need one entry per stage each")
        check_geometry(img_size, patch_size, len(depths), window_size)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depths, self.num_heads = embed_dim, tuple(depths), tuple(num_heads)
        self.window_size, self.mlp_ratio, self.version = window_size, mlp_ratio, version
        self.num_stages = len(depths)
        self.depth = sum(self.depths)
        self.feature_dim = embed_dim * 2 ** (self.num_stages - 1)
        self.output_stride = patch_size * 2 ** (self.num_stages - 1)
        self.grid_size: tuple[int, int] = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        # timm builds (and initialises) the layers; we keep them under timm's names, drop its head.
        timm_cls = SwinTransformer if version == 1 else SwinTransformerV2
        donor = timm_cls(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depths=self.depths, num_heads=self.num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate)
        self.patch_embed, self.layers, self.norm = donor.patch_embed, donor.layers, donor.norm
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)

    # -- forward -------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, H, W] -> patch embeddings [N, h, w, D0] (NHWC, after the patch norm), masked ones blended
        with the mask token: ``x * (1 - m) + mask_token * m`` where mask [N, L] (L = h * w) is true (SimMIM)."""
        if images.shape[1] != self.in_chans:
            raise ValueError(f"model expects {self.in_chans} input channels, got {images.shape[1]}")
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"model expects {self.img_size}x{self.img_size} images, got "
                             f"{tuple(images.shape[-2:])}: build the encoder for that size (adapt_state_dict "
                             f"fits its weights)")
        x = self.patch_embed(images)
        if mask is None:
            return x
        if self.mask_token is None:
            raise ValueError("this encoder was built without a mask token; create it with use_mask_token=True")
        n, h, w, _ = x.shape
        if tuple(mask.shape) != (n, h * w):
            raise ValueError(f"mask must be [N, L] = [{n}, {h * w}] on the patch grid, got {list(mask.shape)}")
        weight = mask.reshape(n, h, w, 1).to(x.dtype)
        return x * (1 - weight) + self.mask_token * weight

    def encode(
        self,
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        return_blocks: bool | Sequence[int] | None = None,
        return_attention: bool | Sequence[int] | None = None,
    ) -> EncoderOutput:
        """Encode images, optionally masked (see :class:`~mimkit.models.encoder.EncoderOutput`).

        images: [N, C, H, W]; mask: [N, L] bool/0-1, masked patches take the mask token.
        return_blocks: True (all) or global block indices (counted over all stages, negative from
            the end) -> blocks {i: [N, h_s * w_s, D_s]} of block i's stage, before the final norm.
        Returns tokens [N, h * w, D] and feature_map [N, D, h, w] of the last stage after the final norm.
        """
        if return_attention:
            require_global_attention(self, "return_attention (attention maps)")
        wanted = _resolve_blocks(return_blocks, self.depth)
        x = self.embed(images, mask)
        blocks, index = {}, 0
        for stage in self.layers:
            x = stage.downsample(x)  # patch merging (Identity in stage 0)
            for blk in stage.blocks:
                x = blk(x)
                if index in wanted:
                    blocks[index] = x.flatten(1, 2)
                index += 1
        x = self.norm(x)
        return EncoderOutput(tokens=x.flatten(1, 2), blocks=blocks, feature_map=x.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked last-stage tokens [N, h * w, D] after the final norm."""
        return self.encode(images).tokens

    # -- pooled features -----------------------------------------------------------------------
    def _check_pooling(self, n_last_blocks: int, avgpool: bool) -> None:
        if avgpool:
            raise ConfigError("avgpool appends the mean patch token to [CLS] features, but a Swin encoder's pooled "
                              "feature already is the mean token: leave avgpool off (linprobe.avgpool=false).")
        last = self.depths[-1]
        if not 1 <= n_last_blocks <= last:
            raise ConfigError(f"n_last_blocks={n_last_blocks}: this Swin encoder has {last} blocks at its last "
                              f"stage's width, so choose n_last_blocks between 1 and {last}.")

    def pooled_features(self, images: torch.Tensor, *, pool: str = "mean", final_norm: bool = True,
                        n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
        """One feature per image, [N, feature_dim * n_last_blocks].

        The mean of the last stage's tokens, after the final norm (``final_norm``) or before it.
        n_last_blocks > 1 concatenates that for each of the last n blocks, all of the last stage (so
        they share its width and its final norm, applied to each when ``final_norm``), earliest
        first. ``pool="cls"`` raises: Swin has no [CLS] token. ``avgpool`` raises (see
        :meth:`pooled_dim`).
        """
        if pool == "cls":
            require_cls_token(self, "[CLS] pooling")
        if pool != "mean":
            raise ConfigError(f"pool must be 'mean' for a Swin encoder, got {pool!r}.")
        self._check_pooling(n_last_blocks, avgpool)
        wanted = list(range(self.depth - n_last_blocks, self.depth))
        blocks = self.encode(images, return_blocks=wanted).blocks
        # mean after the norm, as timm's head pools forward_features (norm is per token, so order matters)
        parts = [(self.norm(blocks[i]) if final_norm else blocks[i]).mean(dim=1) for i in wanted]
        return torch.cat(parts, dim=-1)

    def pooled_dim(self, n_last_blocks: int = 1, avgpool: bool = False) -> int:
        """Width of :meth:`pooled_features`: feature_dim per block. ``avgpool`` adds nothing new for Swin
        (its pooled feature is already the mean token), so asking for it raises a ConfigError."""
        self._check_pooling(n_last_blocks, avgpool)
        return self.feature_dim * n_last_blocks

    # -- optimisation --------------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's Swin layer grouping: stem (patch_embed, mask_token), then each block its own layer; a
        stage's patch merging joins its first block and the final norm joins the last block."""
        blocks: Any = r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.downsample", (0,)),
            (r"^layers\.(\d+)\.\w+\.(\d+)", None),
            (r"^norm", (99999,)),  # timm's MATCH_PREV_GROUP: same layer as the last block
        ]
        return dict(stem=r"^patch_embed|^mask_token", blocks=blocks)

    def no_weight_decay(self) -> set[str]:
        """timm's no-decay parameters (V1: relative position bias tables; V2: logit scales and the
        continuous-position-bias MLPs) and the mask token."""
        keys = _NO_DECAY_KEYS[self.version]
        names = {n for n, _ in self.named_parameters() if any(k in n for k in keys)}
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def architecture(self) -> dict[str, Any]:
        """Arguments that rebuild this encoder (no weights; no training-only options: drop path, mask token)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depths=list(self.depths), num_heads=list(self.num_heads),
                    window_size=self.window_size, mlp_ratio=self.mlp_ratio, version=self.version)

    # -- pretrained weights --------------------------------------------------------------------
    def adapt_state_dict(self, state: dict[str, torch.Tensor], log: Callable[[str], None] = print
                         ) -> dict[str, torch.Tensor]:
        """A timm / mimkit / original-layout Swin state dict made to fit this encoder.

        * original Microsoft layout (patch merging at the end of a stage): merging weights moved to the
          next stage and ``head.`` renamed ``head.fc.``, as timm's checkpoint filter does;
        * relative-position index / attention-mask buffers dropped: this model builds its own;
        * V1 relative position bias tables of another window size resampled with timm's
          ``resize_rel_pos_bias_table`` (V2's continuous position bias needs nothing);
        * patch embedding: another kernel size resampled (timm ``resample_patch_embed``), another channel
          count adapted with timm ``adapt_input_conv`` (1 channel: summed; N: repeated, scaled by C_ckpt / N).
        Each change is logged in one line.
        """
        state = _from_original_layout(dict(state), log)
        self._take_own_buffers(state, log)
        self._resize_bias_tables(state, log)
        self._adapt_patch_embed(state, log)
        if self.mask_token is None:
            state.pop("mask_token", None)
        return state

    def _take_own_buffers(self, state: dict[str, torch.Tensor], log: Callable[[str], None]) -> None:
        own = self.state_dict()
        stale = [k for k in state if k.rsplit(".", 1)[-1] in _BUFFER_NAMES]
        for key in stale:
            if key in own:
                state[key] = own[key]
            else:
                del state[key]
        if stale:
            log(f"{len(stale)} relative-position index / attention-mask buffers of the checkpoint replaced by "
                f"this model's own (built for window {self.window_size} at {self.img_size} px)")

    def _resize_bias_tables(self, state: dict[str, torch.Tensor], log: Callable[[str], None]) -> None:
        changes: Counter[str] = Counter()
        for key in [k for k in state if k.endswith(_BIAS_TABLE)]:
            try:
                attn = self.get_submodule(key[: -len(_BIAS_TABLE)])
            except AttributeError:
                continue  # a block this encoder lacks: the load reports it
            target = attn.relative_position_bias_table.shape
            if state[key].shape == target:
                continue
            old = (int(round(state[key].shape[0] ** 0.5)) + 1) // 2  # table side = 2 * window - 1
            state[key] = resize_rel_pos_bias_table(state[key], new_window_size=attn.window_size,
                                                   new_bias_shape=target)
            changes[f"{old} -> {attn.window_size[0]}"] += 1
        if changes:
            what = ", ".join(f"window {c} ({n} blocks)" for c, n in changes.items())
            log(f"relative position bias tables resampled (timm resize_rel_pos_bias_table): {what}")

    def _adapt_patch_embed(self, state: dict[str, torch.Tensor], log: Callable[[str], None]) -> None:
        weight = state.get("patch_embed.proj.weight")
        if weight is None:
            return
        kernel = self.patch_embed.proj.weight.shape[-2:]
        if weight.shape[-2:] != kernel:
            log(f"patch embedding resampled from a {weight.shape[-1]}- to a {kernel[-1]}-pixel kernel "
                f"(timm resample_patch_embed)")
            weight = resample_patch_embed(weight, list(kernel), interpolation="bicubic", antialias=True)
        if weight.shape[1] != self.in_chans:
            how = "summed over" if self.in_chans == 1 else f"repeated and scaled by {weight.shape[1]}/{self.in_chans} from"
            log(f"patch embedding adapted from {weight.shape[1]} to {self.in_chans} input channels "
                f"(kernel {how} the checkpoint's channels, timm adapt_input_conv)")
            weight = adapt_input_conv(self.in_chans, weight, base_chans=weight.shape[1])
        state["patch_embed.proj.weight"] = weight


def _from_original_layout(state: dict[str, torch.Tensor], log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Original Swin checkpoints merge patches at the end of stage i; timm (and we) at the start of i + 1."""
    if "layers.0.downsample.reduction.weight" not in state:
        return state
    log("checkpoint in the original Swin layout (patch merging at the end of a stage): merging weights moved "
        "to the next stage, head renamed head.fc, as timm does")

    def rename(key: str) -> str:
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        return "head.fc." + key[len("head."):] if key.startswith("head.") and not key.startswith("head.fc.") else key

    return {rename(k): v for k, v in state.items()}


class SwinClassifier(SupervisedClassifier, SwinEncoder):
    """Pretrained Swin + mean of the last stage's tokens after the final norm + a head.

    The linear head is ``head.fc`` as timm's Swin head, so a fine-tuned state dict loads strictly into
    ``timm.create_model(<same swin>, num_classes=num_classes)``; ``head="mlp"`` is DDMIM's head
    (:class:`~mimkit.models.classifier.MLPHead`). ``forward`` is a supervised step.

    Args:
        num_classes: number of classes of the head.
        layer_decay: layer-wise lr decay: block k gets decay^(depth + 1 - layer(k)) (timm groups).
        head_init_std: std of the truncated-normal weights of the head's last Linear (biases start at zero).
        drop_path_rate: stochastic depth while fine-tuning (0.1: timm's Swin default).
        head: linear (``head.fc``) or mlp (``head.norm``, ``head.fc1``, ``head.fc2``).
        head_hidden_dim: hidden width of the mlp head.
        img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio, version: the
            encoder's architecture (see SwinEncoder).
    """

    linear_head_in_holder = True  # timm's ClassifierHead names it head.fc
    head_trunc_normal = staticmethod(trunc_normal_)

    def __init__(self, num_classes: int, layer_decay: float = 0.75, head_init_std: float = 2e-5,
                 drop_path_rate: float = 0.1, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, version: int = 1, head: str = "linear",
                 head_hidden_dim: int = 1024) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depths=depths, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                         drop_path_rate=drop_path_rate, use_mask_token=False, version=version)
        self.init_classifier(num_classes, self.feature_dim, head=head, head_hidden_dim=head_hidden_dim,
                             head_init_std=head_init_std, layer_decay=layer_decay)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> mean last-stage token after the final norm [N, feature_dim] (timm's avg pool)."""
        return self.encode(images).tokens.mean(dim=1)


# -- presets: {name: (SwinEncoder kwargs, description)} -------------------------------------------
_SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SWIN_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))

PRESET_ARGS: dict[str, tuple[dict[str, Any], str]] = {
    # Swin-T/S/B: Swin paper (Liu et al. 2021, arXiv 2103.14030) §3.3 (C = 96/96/128, 32-d heads,
    # window 7) = timm's swin_{tiny,small,base}_patch4_window7_224.
    "swin_tiny_patch4_window7_224": (dict(img_size=224, patch_size=4, window_size=7, **_SWIN_T),
                                     "Swin-T encoder (timm swin_tiny_patch4_window7_224), 224 px"),
    "swin_small_patch4_window7_224": (dict(img_size=224, patch_size=4, window_size=7, **_SWIN_S),
                                      "Swin-S encoder (timm swin_small_patch4_window7_224), 224 px"),
    "swin_base_patch4_window7_224": (dict(img_size=224, patch_size=4, window_size=7, **_SWIN_B),
                                     "Swin-B encoder (timm swin_base_patch4_window7_224), 224 px"),
    # SimMIM (Xie et al. 2022, arXiv 2111.09886) §4.1: Swin-B pre-trained at 192 px with window 6
    # (192 / 32 = 6: the last stage is one window), fine-tuned at 224 px with window 7.
    "swin_base_patch4_window6_192": (dict(img_size=192, patch_size=4, window_size=6, **_SWIN_B),
                                     "Swin-B encoder, window 6, 192 px (SimMIM pre-training size)"),
    # DDMIM's encoder (methods.md §3.2/§3.5): Swin V2-T, patch 4, window 7 at 224 px, drop path 0.1;
    # timm's nearest V2 preset is swinv2_tiny_window8_256 (same sizes at 256 px, window 8).
    "swinv2_tiny_window7_224": (dict(img_size=224, patch_size=4, window_size=7, version=2, drop_path_rate=0.1,
                                     **_SWIN_T), "Swin V2-T encoder, window 7, 224 px (DDMIM)"),
    # 28-px MedMNIST (mimkit's choice): patch 2 gives a 14x14 grid (196 tokens, as ViT/16 at 224);
    # two stages (14x14 -> 7x7) because a third would need an odd 7x7 grid halved; window 7 divides
    # 14 and is the whole 7x7 last stage, so the last stage attends globally. Widths 96 -> 192 make the
    # pooled feature as wide as ViT-T's (the vit_tiny_patch4 preset), depth 2 + 6 as Swin-T's last stages.
    "swin_tiny_patch2_window7_28": (dict(img_size=28, patch_size=2, window_size=7, embed_dim=96, depths=(2, 6),
                                         num_heads=(3, 6)),
                                    "Swin-T-like encoder, 2 stages, patch 2, window 7, 28 px (MedMNIST)"),
}

__all__ = ["SwinEncoder", "SwinClassifier", "PRESET_ARGS", "check_geometry", "stage_grids"]
