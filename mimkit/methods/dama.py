"""DAMA: dual-loss adaptive masked autoencoder (methods.md §1).

Ly et al., "Student Collaboration Improves Self-Supervised Learning: Dual-Loss Adaptive Masked
Autoencoder for Multiplexed Immunofluorescence Brain Images Analysis", arXiv 2205.05194.

Two MAE students with separate weights see the same image:

1. student 1 gets a random mask and reconstructs (norm-pix) pixels: ``rec1``;
2. its per-patch error decides student 2's mask (:func:`mimkit.masking.dama_adaptive_masking`):
   student 2 sees O of student 1's visible patches plus the K - O patches student 1
   reconstructed best, and reconstructs the rest, the hardest first: ``rec2``;
3. a feature ("info") loss regresses a softmax projection of student 1's encoder tokens onto
   the softmax of the layer-normalised mean of student 2's last-k block MLP outputs
   (data2vec-style target): ``info``.

Total loss = rec1 + rec2 + info_loss_weight * info (info off before ``stable_epoch``). As in the
released code there is no EMA teacher and no stop-gradient on the info target: both students
get gradients from the info loss. ``student2_mask="random"`` gives DAMA_rand (§1.5).

Deviations from the released code, all deliberate (methods.md §1.4, §1.10):

* The adaptive mask is built per sample. The original broadcasts the overlap indices over the
  batch (student 2 then has ~40 instead of 157 masked patches at batch 64); that behaviour is
  available only with ``compat_batch_broadcast_overlap_bug=True``.
* The overlap is drawn at random among student 1's visible patches, not "the first O indices".
* ``info_token_alignment="cls_overlap"`` compares [CLS] with [CLS] and each shared patch with
  the same patch; the default ``"as_written"`` compares token positions as the original does
  (only [CLS] is then guaranteed to be the same thing on both sides).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import CheckpointError, ConfigError
from mimkit.masking import (
    MaskDraw,
    dama_adaptive_masking,
    dama_batch_broadcast_masking,
    dama_mask_sizes,
    num_visible,
    uniform_noise,
)
from mimkit.methods.base import StepOutput
from mimkit.methods.mae import MAE, normalized_pixel_target
from mimkit.models.vit import MaskedViT

# Noise streams of mimkit.masking.uniform_noise: one per random decision of a step.
_STREAM_STUDENT1 = 0
_STREAM_STUDENT2 = 1

_ALIGNMENTS = ("as_written", "cls_overlap")
_STUDENT2_MASKS = ("adaptive", "random")
_REDUCTIONS = ("sum", "mean")


class DAMAStep(NamedTuple):
    """Everything one DAMA step computes.

    rec1, rec2, info: scalar losses (info before its weight); loss: the total that is optimised.
    mask1, mask2: [N, L] (1 = masked); error1, error2: [N, L] per-patch squared error;
    pred1, pred2: [N, L, p*p*C] predictions in target space.
    """

    loss: torch.Tensor
    rec1: torch.Tensor
    rec2: torch.Tensor
    info: torch.Tensor
    mask1: torch.Tensor
    mask2: torch.Tensor
    error1: torch.Tensor
    error2: torch.Tensor
    pred1: torch.Tensor
    pred2: torch.Tensor


def _encode_with_mlp_outputs(
    vit: MaskedViT, images: torch.Tensor, ids_keep: torch.Tensor, blocks: set[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Visible-token forward that also returns MLP-branch outputs MLP(LN2(x)) of ``blocks``.

    images [N, C, H, W], ids_keep [N, K] -> (tokens [N, 1+K, D] after the final norm,
    list of [N, 1+K, D] in block order). The MLP output is taken before layer scale,
    drop-path and the residual add, as DAMA's target; the composition mirrors timm's ``Block``.
    """
    x = vit.embed_patches(images)
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    mlp_outputs = []
    for i, blk in enumerate(vit.blocks):
        if i not in blocks:
            x = blk(x)
            continue
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        f = blk.mlp(blk.norm2(x))
        x = x + blk.drop_path2(blk.ls2(f))
        mlp_outputs.append(f)
    return vit.norm(x), mlp_outputs


def _scatter_to_grid(tokens: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Patch tokens [N, K, D] in encoder order -> [N, L, D] at their patch index (zeros elsewhere)."""
    n, _, d = tokens.shape
    grid = tokens.new_zeros(n, num_patches, d)
    return grid.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), tokens)


class DAMA(nn.Module):
    """Two MAE students trained together with an adaptive mask and a feature loss.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
        decoder_embed_dim, decoder_depth, decoder_num_heads: each student's MAE (same for both).
        mask_ratio: r, fraction of patches each student must reconstruct (DAMA recipe: 0.8).
            The adaptive mask needs r >= 0.5.
        mask_overlap_ratio: rho, fraction of student 1's visible patches student 2 also sees.
        last_k_blocks: student 2's last blocks whose MLP outputs form the info target (all
            blocks when it exceeds ``depth``, as the original's ``y[-k:]``).
        norm_pix_loss: per-patch normalised pixel targets (forced on in the released code).
        info_loss_weight: alpha, weight of the info loss (0 disables it).
        info_loss_beta: SmoothL1 beta (original ``loss_beta`` 2; 0 = squared error).
        info_loss_reduction: "sum" over batch, tokens and features (original) or "mean" over
            compared tokens (the feature dimension is always summed).
        info_token_alignment: "as_written" (position-wise, original) or "cls_overlap" ([CLS] and
            the shared patches, matched by patch index).
        student2_mask: "adaptive" (DAMA_adap) or "random" (DAMA_rand, an independent random mask).
        stable_epoch: the info loss is off (weight 0) before this epoch.
        compat_batch_broadcast_overlap_bug: reproduce the released code's batch-broadcast
            overlap (methods.md §1.4 BUG); only to reproduce original numbers.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.8,
        mask_overlap_ratio: float = 0.5,
        last_k_blocks: int = 6,
        norm_pix_loss: bool = True,
        info_loss_weight: float = 1.0,
        info_loss_beta: float = 2.0,
        info_loss_reduction: str = "sum",
        info_token_alignment: str = "as_written",
        student2_mask: str = "adaptive",
        stable_epoch: float = 0.0,
        compat_batch_broadcast_overlap_bug: bool = False,
    ) -> None:
        super().__init__()
        for name, value, choices in (
            ("info_token_alignment", info_token_alignment, _ALIGNMENTS),
            ("student2_mask", student2_mask, _STUDENT2_MASKS),
            ("info_loss_reduction", info_loss_reduction, _REDUCTIONS),
        ):
            if value not in choices:
                raise ConfigError(f"model.{name} must be one of {', '.join(choices)}, got {value!r}.")
        if last_k_blocks < 1:
            raise ConfigError(f"model.last_k_blocks must be at least 1, got {last_k_blocks}.")
        if info_loss_weight < 0 or info_loss_beta < 0:
            raise ConfigError("model.info_loss_weight and model.info_loss_beta must be >= 0.")
        if compat_batch_broadcast_overlap_bug and student2_mask != "adaptive":
            raise ConfigError("compat_batch_broadcast_overlap_bug only applies to student2_mask=adaptive.")
        student = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mask_ratio=mask_ratio,
            norm_pix_loss=norm_pix_loss,
        )
        self.student1 = MAE(**student)
        self.student2 = MAE(**student)
        # Original `projs_head` (key-compatible indices 0..5); its final softmax is applied in fp32.
        self.info_head = nn.Sequential(
            nn.Linear(embed_dim, 2 * embed_dim), nn.LayerNorm(2 * embed_dim), nn.ReLU(),
            nn.Linear(2 * embed_dim, embed_dim), nn.LayerNorm(embed_dim), nn.ReLU(),
        )
        # Geometry, as on MAE (benchmarks, figures and transforms read these).
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size, self.num_patches = self.student1.grid_size, self.student1.num_patches
        try:
            if student2_mask == "adaptive":
                self.num_keep, self.num_overlap = dama_mask_sizes(self.num_patches, mask_ratio, mask_overlap_ratio)
            else:  # two independent random masks: any ratio works, there is no designed overlap
                self.num_keep, self.num_overlap = num_visible(self.num_patches, mask_ratio), 0
        except ValueError as exc:
            raise ConfigError(f"model: {exc}.") from None
        self.mask_ratio, self.mask_overlap_ratio = mask_ratio, mask_overlap_ratio
        self.last_k_blocks, self.norm_pix_loss = min(last_k_blocks, depth), norm_pix_loss
        self.info_loss_weight, self.info_loss_beta = info_loss_weight, info_loss_beta
        self.info_loss_reduction, self.info_token_alignment = info_loss_reduction, info_token_alignment
        self.student2_mask, self.stable_epoch = student2_mask, stable_epoch
        self.compat_batch_broadcast_overlap_bug = compat_batch_broadcast_overlap_bug
        self._info_on = stable_epoch <= 0

    # -- engine interface ----------------------------------------------------------------------
    @property
    def encoder(self) -> MaskedViT:
        """Default encoder for evaluation: student 1 (the one the original's converter exports)."""
        return self.student1

    def eval_encoders(self) -> dict[str, MaskedViT]:
        return {"student1": self.student1, "student2": self.student2}

    def no_weight_decay(self) -> set[str]:
        return {f"{name}.{p}" for name in ("student1", "student2") for p in getattr(self, name).no_weight_decay()}

    def set_epoch(self, progress: float) -> None:
        """Engine hook (fractional epoch): the info loss joins at ``stable_epoch``."""
        self._info_on = progress >= self.stable_epoch

    # -- masks ---------------------------------------------------------------------------------
    def student2_draw(
        self, mask1: torch.Tensor, error1: torch.Tensor, noise: torch.Tensor
    ) -> MaskDraw:
        """Student 2's mask [N, L] from student 1's mask and per-patch error; noise [N, L] uniform."""
        if self.student2_mask == "random":
            return self.student2.draw_mask(mask1.shape[0], mask1.device, noise=noise)
        if self.compat_batch_broadcast_overlap_bug:
            return dama_batch_broadcast_masking(mask1, error1, self.num_keep, self.num_overlap)
        return dama_adaptive_masking(mask1, error1, self.num_keep, self.num_overlap, noise)

    # -- losses --------------------------------------------------------------------------------
    def info_loss(
        self, tokens1: torch.Tensor, mlp_outputs2: list[torch.Tensor], draw1: MaskDraw, draw2: MaskDraw
    ) -> torch.Tensor:
        """Feature loss. tokens1 [N, 1+K, D] student 1's encoder output; mlp_outputs2: last-k
        [N, 1+K, D] MLP outputs of student 2; draws give each sequence's patch indices."""
        pred = torch.softmax(self.info_head(tokens1).float(), dim=-1)
        target = torch.stack([F.layer_norm(f.float(), f.shape[-1:]) for f in mlp_outputs2]).mean(dim=0)
        target = torch.softmax(target, dim=-1)
        if self.info_token_alignment == "as_written":
            weight = None  # every position compared, [CLS] with [CLS], then token i with token i
        else:
            # [CLS] pair plus every patch both students saw, each at its own patch index.
            shared = (1 - draw1.mask) * (1 - draw2.mask)  # [N, L]
            pred = torch.cat([pred[:, :1], _scatter_to_grid(pred[:, 1:], draw1.ids_keep, self.num_patches)], 1)
            target = torch.cat([target[:, :1], _scatter_to_grid(target[:, 1:], draw2.ids_keep, self.num_patches)], 1)
            weight = torch.cat([shared.new_ones(shared.shape[0], 1), shared], dim=1).float()
        if self.info_loss_beta == 0:
            per_token = (pred - target).pow(2).sum(dim=-1)
        else:
            per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=self.info_loss_beta).sum(dim=-1)
        if weight is None:
            total, count = per_token.sum(), per_token.new_tensor(per_token.numel())
        else:
            total, count = (per_token * weight).sum(), weight.sum()
        return total if self.info_loss_reduction == "sum" else total / count

    def step(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> DAMAStep:
        """One DAMA step. images [N, C, H, W]; sample_seeds [N] int64 or None."""
        s1, s2 = self.student1, self.student2
        target = normalized_pixel_target(images, s1.patch_size, self.norm_pix_loss).float()

        n, device = images.shape[0], images.device
        noise1 = uniform_noise(sample_seeds, n, self.num_patches, _STREAM_STUDENT1, device)
        noise2 = uniform_noise(sample_seeds, n, self.num_patches, _STREAM_STUDENT2, device)
        draw1 = s1.draw_mask(n, device, noise=noise1)
        tokens1 = s1.encode(images, ids_keep=draw1.ids_keep).tokens
        pred1 = s1.decode(tokens1, draw1.ids_restore)
        error1 = (pred1.float() - target).pow(2).mean(dim=-1)  # [N, L]
        rec1 = (error1 * draw1.mask).sum() / draw1.mask.sum()

        # The mask is a decision, not a function to differentiate: error1 enters it detached.
        draw2 = self.student2_draw(draw1.mask, error1.detach(), noise2)
        last_blocks = set(range(s2.depth - self.last_k_blocks, s2.depth))
        tokens2, mlp_outputs2 = _encode_with_mlp_outputs(s2, images, draw2.ids_keep, last_blocks)
        pred2 = s2.decode(tokens2, draw2.ids_restore)
        error2 = (pred2.float() - target).pow(2).mean(dim=-1)
        rec2 = (error2 * draw2.mask).sum() / draw2.mask.sum()

        info = self.info_loss(tokens1, mlp_outputs2, draw1, draw2)
        # Weight 0 (not skipping) before stable_epoch keeps every parameter in the graph (DDP).
        info_weight = self.info_loss_weight if self._info_on else 0.0
        loss = rec1 + rec2 + info_weight * info
        return DAMAStep(loss, rec1, rec2, info, draw1.mask, draw2.mask, error1, error2, pred1, pred2)

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> StepOutput:
        out = self.step(images, sample_seeds)
        metrics = {"loss": out.loss, "rec1": out.rec1, "rec2": out.rec2, "info": out.info}
        return StepOutput(out.loss, {k: v.detach() for k, v in metrics.items()})


def dama_original_to_mimkit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original DAMA checkpoint's model state dict to :class:`DAMA` keys.

    Original keys (``main_pretrain.py``, possibly ``module.``-prefixed from DDP):
    ``base_encoder.*`` = student 1, ``momentum_encoder.*`` = student 2 (despite the name; both
    are trained by gradient), ``projs_head.{0,1,3,4}.*`` = the info projection. Inside each
    student the names are the official MAE ones, which :class:`MAE` shares.
    """
    renames = (("base_encoder.", "student1."), ("momentum_encoder.", "student2."), ("projs_head.", "info_head."))
    out = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for old, new in renames:
            if name.startswith(old):
                out[new + name[len(old):]] = value
                break
        else:
            raise CheckpointError(
                f"{key!r} is not a key of an original DAMA checkpoint (expected base_encoder.*, momentum_encoder.* "
                f"or projs_head.*): is this a DAMA pretraining checkpoint?"
            )
    return out


__all__ = ["DAMA", "DAMAStep", "dama_original_to_mimkit"]
