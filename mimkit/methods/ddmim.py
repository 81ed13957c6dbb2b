"""DDMIM: masked image modeling on Swin with self-distillation, perceptual and contrastive terms.

The DDMIMV9 model of 1810082562/ddmim (methods.md §3). A Swin student sees the image with tokens
zeroed at the input of every stage but the last; an EMA teacher of the student sees it whole.

1. Mask: every stage-0 token is masked with probability ``mask_prob`` (0.5), independently; the
   mask of stage s is the nearest-neighbour subsample of that mask (the top-left token of each
   2^s x 2^s block). The student multiplies its stage inputs by (1 - mask): zero vectors, no mask
   token.
2. Perceptual (self-distillation) term per stage i: P_i = SmoothL1(student_i, teacher_i), the mean
   over all elements (beta 1). A stage's output is the seed's (Microsoft-layout) one: its blocks
   and then the patch merging into the next stage; the last stage's is its blocks' output.
3. Reconstruction (SimMIM head): 1x1 conv of the normed last map to stride^2 * C channels,
   PixelShuffle(stride); SmoothL1 against the normalised input on the pixels of masked tokens,
   summed and divided by (masked pixels * C + 1e-5), SimMIM's normalisation.
4. Contrastive: z = projector(head(mean of the normed last-stage tokens)) for student and
   teacher; InfoNCE over the batch, logits = cos(z_s^n, z_t^m) / tau, positive m = n.
5. Loss = sum_i stage_weights[i] * P_i + L_rec + contrastive_weight * L_con.
6. After an optimizer step with index k (from 0), the teacher follows the student when
   k % ``ema_every`` == 0: the first such update copies, later ones are EMA(``ema_decay``) (torch's
   AveragedModel as the seed uses it). The seed counts k within an epoch (Lightning's batch_idx);
   here it counts over the run, so the teacher's pace does not depend on the epoch length.

Where the seed's code differs from what it describes, the seed's behaviour is a named switch,
off by default:

* ``contrastive_self_in_denominator``: the seed's logits are [cos(z_s^n, z_t^n), cos(z_s^n, z_t^m)
  with the diagonal set to 0 (not removed)] / tau, so a zero logit for the own image stays among the
  negatives;
* ``teacher_shares_student_modules``: the seed's teacher is an EMA of the Swin stages only; its input
  is the student's patch embedding of the image and its pooled output goes through the student's
  final norm, head and projector (without gradient);
* ``reconstruction_mean_over_all_pixels``: the seed averages the masked-pixel SmoothL1 over all
  pixels (visible ones contribute zeros), which scales it by the masked fraction.

Shapes: images [N, C, H, W]; stage-0 grid (h, w) = (H / patch, W / patch), L = h * w; stage s works
on NHWC maps [N, h / 2^s, w / 2^s, D_s].
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.errors import ConfigError
from mimkit.masking import bernoulli_token_mask, subsample_mask
from mimkit.methods.base import StepOutput
from mimkit.methods.ema import copy_into_teacher_, ema_update_, freeze_
from mimkit.methods.simmim import SimMIMReconstruction, patch_mask_to_pixels
from mimkit.models.swin import PRESET_ARGS as SWIN_PRESET_ARGS, SwinEncoder


class StagePass(NamedTuple):
    """stages: per-stage outputs (the seed's layout, see the module docstring), NHWC;
    normed: [N, h', w', D] last map after the final norm; embedding: [N, out] projected pooled feature."""

    stages: list[torch.Tensor]
    normed: torch.Tensor
    embedding: torch.Tensor


def perceptual_losses(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """[S] SmoothL1 (beta 1, mean over all elements) between each stage's student and teacher outputs, fp32."""
    return torch.stack([F.smooth_l1_loss(s.float(), t.float(), beta=1.0) for s, t in zip(student, teacher)])


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor,
                     mean_over_all_pixels: bool = False) -> torch.Tensor:
    """SmoothL1 (beta 1) on masked pixels. pred, target [N, C, H, W]; pixel_mask [N, 1, H, W], 1 = masked.

    Default: summed over masked pixels and divided by (masked pixels * C + 1e-5) (SimMIM). With
    ``mean_over_all_pixels`` (the seed) divided by every element instead.
    """
    mask = pixel_mask.float()
    error = F.smooth_l1_loss(pred.float() * mask, target.float() * mask, beta=1.0, reduction="none")
    if mean_over_all_pixels:
        return error.mean()
    return error.sum() / (mask.sum() * pred.shape[1] + 1e-5)


def info_nce(student: torch.Tensor, teacher: torch.Tensor, tau: float,
             self_in_denominator: bool = False) -> torch.Tensor:
    """Contrastive loss of student embeddings [N, E] against the teacher's [N, E] of the same batch.

    logits[n, m] = cos(s_n, t_m) / tau, cross-entropy with target n. ``self_in_denominator`` (the
    seed): logits [cos(s_n, t_n), row n of the cosine matrix with its diagonal set to 0] / tau,
    target 0, so the own image also appears as a zero logit among the negatives.
    """
    cos = F.normalize(student.float(), dim=-1) @ F.normalize(teacher.float(), dim=-1).T  # [N, N]
    if not self_in_denominator:
        return F.cross_entropy(cos / tau, torch.arange(cos.shape[0], device=cos.device))
    positive = cos.diagonal().unsqueeze(1)
    negatives = cos * (1 - torch.eye(cos.shape[0], device=cos.device))
    logits = torch.cat([positive, negatives], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(cos.shape[0], dtype=torch.long, device=cos.device))


class DDMIM(nn.Module):
    """DDMIM on a Swin encoder (V1 or V2); see the module docstring for the losses and switches.

    Args:
        img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio,
            version: the Swin encoder (:class:`~mimkit.models.swin.SwinEncoder`).
        drop_path_rate: student stochastic depth (the teacher has none).
        mask_prob: probability that a stage-0 token is masked (seed: masking_ratio[0] = 0.5).
        masked_stages: how many stages, from the first, get masked inputs; None = all but the last
            (the seed: stages 0-2 of 4).
        stage_weights: weight of each stage's perceptual term; None = 1 for every stage but the
            last, 0.1 for the last (the seed's stagefactor [1, 1, 1, 0.1]).
        embed_dim_out: width of the embedding head on the pooled feature (seed: num_classes 1024).
        projector_dim: hidden and output width of the projector (seed: 512).
        tau: InfoNCE temperature (0.05). contrastive_weight: alpha (1).
        ema_decay: teacher EMA decay per update (0.999). ema_every: optimizer steps between
            teacher updates (32).
        contrastive_self_in_denominator, teacher_shares_student_modules,
            reconstruction_mean_over_all_pixels: the seed's code where it differs (module docstring).
    """

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
        version: int = 2,
        drop_path_rate: float = 0.1,
        mask_prob: float = 0.5,
        masked_stages: int | None = None,
        stage_weights: Sequence[float] | None = None,
        embed_dim_out: int = 1024,
        projector_dim: int = 512,
        tau: float = 0.05,
        contrastive_weight: float = 1.0,
        ema_decay: float = 0.999,
        ema_every: int = 32,
        contrastive_self_in_denominator: bool = False,
        teacher_shares_student_modules: bool = False,
        reconstruction_mean_over_all_pixels: bool = False,
    ) -> None:
        super().__init__()
        swin = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
                    num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, version=version)
        self.encoder = SwinEncoder(**swin, drop_path_rate=drop_path_rate)
        stages = self.encoder.num_stages
        self.masked_stages = stages - 1 if masked_stages is None else masked_stages
        self.stage_weights = [1.0] * (stages - 1) + [0.1] if stage_weights is None else [float(w) for w in stage_weights]
        self._check(stages, mask_prob, tau, ema_decay, ema_every)
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, patch_size
        self.grid_size, self.num_patches = self.encoder.grid_size, self.encoder.num_patches
        self.mask_prob, self.tau, self.contrastive_weight = mask_prob, tau, contrastive_weight
        self.ema_decay, self.ema_every = ema_decay, ema_every
        self.contrastive_self_in_denominator = contrastive_self_in_denominator
        self.teacher_shares_student_modules = teacher_shares_student_modules
        self.reconstruction_mean_over_all_pixels = reconstruction_mean_over_all_pixels

        width, stride = self.encoder.feature_dim, self.encoder.output_stride
        self.head = nn.Linear(width, embed_dim_out)
        self.projector = _projector(embed_dim_out, projector_dim)
        self.decoder = nn.Sequential(nn.Conv2d(width, stride**2 * in_chans, kernel_size=1), nn.PixelShuffle(stride))
        self.teacher = SwinEncoder(**swin)
        self.teacher_head = nn.Linear(width, embed_dim_out)
        self.teacher_projector = _projector(embed_dim_out, projector_dim)
        copy_into_teacher_(self.teacher_pairs())
        freeze_((self.teacher, self.teacher_head, self.teacher_projector))
        # Optimizer steps seen and teacher updates made: buffers, so a resumed run keeps the EMA's pace.
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("teacher_updates", torch.zeros((), dtype=torch.long))

    def _check(self, stages: int, mask_prob: float, tau: float, ema_decay: float, ema_every: int) -> None:
        if not 0 <= self.masked_stages <= stages:
            raise ConfigError(f"masked_stages={self.masked_stages}: this Swin has {stages} stages, so choose 0 to "
                              f"{stages}.")
        if len(self.stage_weights) != stages:
            raise ConfigError(f"stage_weights needs one weight per stage ({stages}), got {self.stage_weights}.")
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"mask_prob must lie in (0, 1), got {mask_prob}.")
        if tau <= 0 or not 0.0 <= ema_decay < 1.0 or ema_every < 1:
            raise ConfigError(f"need tau > 0, ema_decay in [0, 1) and ema_every >= 1; got {tau}, {ema_decay}, "
                              f"{ema_every}.")

    # -- engine hooks --------------------------------------------------------------------------
    def eval_encoders(self) -> dict[str, nn.Module]:
        """The student (the seed's evaluation encoder) first, then the EMA teacher."""
        return {"encoder": self.encoder, "teacher": self.teacher}

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) module pairs the EMA couples."""
        return [(self.teacher, self.encoder), (self.teacher_head, self.head),
                (self.teacher_projector, self.projector)]

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Every ``ema_every`` optimizer steps (from the first): copy once, then EMA."""
        if int(self.optimizer_steps) % self.ema_every == 0:
            if int(self.teacher_updates) == 0:
                copy_into_teacher_(self.teacher_pairs())
            else:
                ema_update_(self.teacher_pairs(), self.ema_decay)
            self.teacher_updates += 1
        self.optimizer_steps += 1

    # -- masks ---------------------------------------------------------------------------------
    def draw_mask(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L] bool stage-0 token mask (True = masked) for images [N, C, H, W]."""
        seeds = sample_seeds.to(images.device) if sample_seeds is not None else None
        return bernoulli_token_mask(seeds, images.shape[0], self.grid_size, self.mask_prob, device=images.device)

    def stage_keep(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """[N, h_s, w_s, 1] keep factors (1 = visible) of each masked stage, from the stage-0 mask [N, L]."""
        h, w = self.grid_size
        keep = []
        for s in range(self.masked_stages):
            sub = subsample_mask(mask, (h, w), 2**s)
            keep.append((~sub).reshape(mask.shape[0], h >> s, w >> s, 1))
        return keep

    # -- forward -------------------------------------------------------------------------------
    def _stages(self, encoder: SwinEncoder, x: torch.Tensor, keep: Sequence[torch.Tensor] = ()) -> tuple[
            list[torch.Tensor], torch.Tensor]:
        """Run the Swin stages on patch embeddings x [N, h, w, D0]; stage s's input times keep[s].

        Returns the per-stage outputs (blocks, then the next stage's patch merging) and the last map.
        """
        outputs = []
        for s, stage in enumerate(encoder.layers):
            x = stage.downsample(x)  # timm merges at the start of a stage: that closes the seed's stage s - 1
            if s > 0:
                outputs.append(x)
            if s < len(keep):
                x = x * keep[s].to(x.dtype)
            for block in stage.blocks:
                x = block(x)
        outputs.append(x)
        return outputs, x

    def _embed(self, normed: torch.Tensor, head: nn.Module, projector: nn.Module) -> torch.Tensor:
        """Normed last map [N, h', w', D] -> projected embedding of its mean token [N, projector_dim]."""
        return projector(head(normed.mean(dim=(1, 2))))

    def student_pass(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[StagePass, torch.Tensor]:
        """Masked student pass; also returns its patch embeddings [N, h, w, D0] (the seed's teacher input)."""
        tokens = self.encoder.embed(images)
        stages, last = self._stages(self.encoder, tokens, self.stage_keep(mask))
        normed = self.encoder.norm(last)
        return StagePass(stages, normed, self._embed(normed, self.head, self.projector)), tokens

    @torch.no_grad()
    def teacher_pass(self, images: torch.Tensor, student_tokens: torch.Tensor) -> StagePass:
        """Unmasked EMA-teacher pass (with ``teacher_shares_student_modules``: on the student's embedding,
        through the student's norm, head and projector)."""
        if self.teacher_shares_student_modules:
            stages, last = self._stages(self.teacher, student_tokens.detach())
            normed = self.encoder.norm(last)
            return StagePass(stages, normed, self._embed(normed, self.head, self.projector))
        stages, last = self._stages(self.teacher, self.teacher.embed(images))
        normed = self.teacher.norm(last)
        return StagePass(stages, normed, self._embed(normed, self.teacher_head, self.teacher_projector))

    def predict_pixels(self, normed: torch.Tensor) -> torch.Tensor:
        """Normed last map [N, h', w', D] -> predicted normalised pixels [N, C, H, W]."""
        return self.decoder(normed.permute(0, 3, 1, 2))

    def losses(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term for images [N, C, H, W] and a stage-0 mask [N, L]: perceptual [S], rec, con, loss, pred."""
        student, tokens = self.student_pass(images, mask)
        teacher = self.teacher_pass(images, tokens)
        perceptual = perceptual_losses(student.stages, teacher.stages)
        pred = self.predict_pixels(student.normed)
        pixel_mask = patch_mask_to_pixels(mask, self.grid_size, self.patch_size)
        rec = masked_smooth_l1(pred, images, pixel_mask, self.reconstruction_mean_over_all_pixels)
        con = info_nce(student.embedding, teacher.embedding, self.tau, self.contrastive_self_in_denominator)
        weights = torch.tensor(self.stage_weights, device=perceptual.device)  # on the device: no host sync
        loss = (weights * perceptual).sum() + rec + self.contrastive_weight * con
        return dict(loss=loss, perceptual=perceptual, rec=rec, con=con, pred=pred, pixel_mask=pixel_mask)

    def reconstruct(self, images: torch.Tensor, *, mask: torch.Tensor | None = None,
                    sample_seeds: torch.Tensor | None = None) -> SimMIMReconstruction:
        """Student reconstruction (figures): loss = the reconstruction term; fields as SimMIM's."""
        mask = (self.draw_mask(images, sample_seeds) if mask is None else mask).bool()
        student, _ = self.student_pass(images, mask)
        pred = self.predict_pixels(student.normed)
        pixel_mask = patch_mask_to_pixels(mask, self.grid_size, self.patch_size)
        rec = masked_smooth_l1(pred, images, pixel_mask, self.reconstruction_mean_over_all_pixels)
        return SimMIMReconstruction(rec, pred, pixel_mask, mask)

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None) -> StepOutput:
        terms = self.losses(images, self.draw_mask(images, sample_seeds))
        metrics = {"loss": terms["loss"].detach(), "rec": terms["rec"].detach(), "con": terms["con"].detach()}
        for s, value in enumerate(terms["perceptual"].detach()):
            metrics[f"perceptual{s}"] = value
        return StepOutput(terms["loss"], metrics)


def _projector(width: int, out: int) -> nn.Sequential:
    """The seed's projection head: Linear(width, out) -> GELU -> Linear(out, out)."""
    return nn.Sequential(nn.Linear(width, out), nn.GELU(), nn.Linear(out, out))


# -- presets: {name: (class, kwargs, description)}; registered by mimkit.registry ----------------
PRESET_ARGS: dict[str, tuple[type[DDMIM], dict[str, Any], str]] = {
    # The seed's DDMIMV9 (methods.md §3.2/§3.5): Swin V2-T, patch 4, window 7 at 224 px, drop path 0.1,
    # mask 0.5 on stages 0-2, stagefactor [1, 1, 1, 0.1], 1024-d head, 512-d projector, tau 0.05, alpha 1,
    # EMA 0.999 every 32 steps.
    "ddmim_swinv2_tiny_window7_224": (
        DDMIM, {**SWIN_PRESET_ARGS["swinv2_tiny_window7_224"][0]},
        "DDMIM (DDMIMV9) on Swin V2-T, window 7, 224 px (the seed's model)"),
    # 28 px (MedMNIST) on the 2-stage small Swin (patch 2: a 14x14 then 7x7 grid, window 7): stage 0 is
    # masked (the seed masks every stage but the last), weights [1, 0.1] (the seed's 1 for masked stages,
    # 0.1 for the last); Swin V1 as the SimMIM 28-px preset, so the two compare on one backbone.
    "ddmim_swin_tiny_28": (
        DDMIM, {**SWIN_PRESET_ARGS["swin_tiny_patch2_window7_28"][0], "version": 1, "drop_path_rate": 0.0},
        "DDMIM on the small Swin (patch 2, window 7, 2 stages), 28 px (MedMNIST)"),
}

__all__ = ["DDMIM", "PRESET_ARGS", "info_nce", "masked_smooth_l1", "perceptual_losses"]
