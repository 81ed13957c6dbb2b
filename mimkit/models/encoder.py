"""The encoder contract: what every backbone family provides, and all that evaluation,
checkpoints, fine-tuning, figures and the registry may use.

A family is one file in ``mimkit/models/`` (``vit.py``, ``swin.py``); adding one touches no
evaluation module. An encoder is an ``nn.Module`` with:

Attributes
    family:               "vit", "swin", ... (``mimkit.registry.classifier_for`` maps it to the
                          family's fine-tuning classifier).
    in_chans, img_size:   the input it was built for (square, any channel count).
    patch_size:           input stride of the patch grid the masks live on.
    grid_size:            (h, w) of that grid at ``img_size``; ``num_patches = h * w``.
    feature_dim:          width of :meth:`pooled_features` for one block (ViT: embed_dim; Swin:
                          the last stage's width).
    depth:                number of blocks (layer decay gives each its own layer).
    has_cls_token:        pooled features can be the [CLS] token.
    default_pool:         "cls" or "mean": the pooling evaluation uses unless told otherwise.
    has_global_attention: every token attends to every token (attention maps, rollout, AttMask).
    state_prefixes:       the state-dict key prefixes that are the encoder's own weights (what
                          fine-tuning transfers; a method's decoder or a classifier's head are not).
    output_stride:        input pixels per cell of ``EncoderOutput.feature_map``.

Methods
    encode(images, *, mask=None, return_blocks=None, return_attention=None) -> EncoderOutput
        images [N, C, H, W]; mask [N, L] bool on the patch grid: masked patch embeddings are
        replaced by the learned mask token (built with ``use_mask_token=True``). ViT also takes
        ``ids_keep`` (visible tokens only). See :class:`EncoderOutput` for what comes back.
    pooled_features(images, *, pool="cls"|"mean", final_norm=True, n_last_blocks=1,
                    avgpool=False) -> [N, pooled_dim(...)]
        One feature per image (k-NN, linear probes). ``pool="cls"`` needs ``has_cls_token``;
        ``n_last_blocks > 1`` concatenates the pooled features of the last blocks (DINO protocol).
    pooled_dim(n_last_blocks=1, avgpool=False) -> int
    group_matcher(coarse=False) -> dict
        timm's layer grouping (stem, blocks), for ``timm.optim.param_groups_layer_decay``.
    no_weight_decay() -> set[str]
    architecture() -> dict
        Constructor arguments that rebuild the same encoder without weights (random-init baselines).
    adapt_state_dict(state) -> dict
        A pretrained state dict of this family made to fit this encoder: position table
        or relative-position bias resampled to this input / window size, patch embedding adapted
        to this channel count (``log`` says what was done).

Helpers here check capabilities with one sentence a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mimkit.errors import ConfigError


@dataclass
class EncoderOutput:
    """What ``encode`` returns.

    tokens:      [N, P + T, D] after the final norm. P prefix tokens (1 = [CLS] for ViT, 0 for
                 Swin); T = K visible tokens (ViT ``ids_keep``) or all tokens of the last stage.
    blocks:      {block index: output of that block before the final norm}; ViT [N, 1 + T, D],
                 Swin [N, h_s * w_s, D_s] of its stage.
    attentions:  {block index: [N, heads, P + T, P + T] softmax attention} (global attention only).
    feature_map: [N, D, h, w] last-stage map after the final norm (no prefix tokens) when the
                 full grid was encoded; stride ``output_stride`` pixels (SimMIM's decoder input).
    """

    tokens: torch.Tensor
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    feature_map: torch.Tensor | None = None


def require_cls_token(encoder: nn.Module, what: str) -> None:
    if not encoder.has_cls_token:
        raise ConfigError(f"{what} needs a [CLS] token, which this {encoder.family} encoder does not have: use mean "
                          f"pooling (--pool mean / linprobe.pool=mean) instead.")


def require_global_attention(encoder: nn.Module, what: str) -> None:
    if not encoder.has_global_attention:
        raise ConfigError(f"{what} needs global attention, which this {encoder.family} encoder does not have "
                          f"(its attention is windowed): choose --what reconstruction or masks.")
