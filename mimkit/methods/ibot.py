"""iBOT with attention-guided masks (methods.md §5): AttMask, rollout, log/power, multi-layer.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022; masks from
Kakogeorgiou et al., "What to Hide from Your Students: Attention-Guided Masked Image
Modeling" (AttMask, ECCV 2022) and Reppas' MIM_on_self-supervision (scores from any layer,
log/power pre-processing, rollout, one strategy and layer per global crop, contrastive term).

One training step on ``images = [global_1, global_2, local_1, ..., local_n]``:

1. The EMA teacher encodes the two unmasked global crops ``[2N, C, G, G]`` (no gradient) and,
   when a mask needs it, returns the softmax attention of the requested blocks.
2. Each global crop q gets a mask ``[N, L]`` from its own strategy (random, block,
   AttMask high/low/hint) and, for AttMask, its own attention score (raw/log/power at any
   block, or rollout over all/last/middle blocks), computed from that crop's teacher attention.
   Per image: ratio r ~ U(mask_ratio_range), count int(L r), and with probability 1 - mask_prob no mask.
3. The student encodes the masked global crops (masked patches -> ``masked_embed``) and the
   unmasked local crops (position table resampled to their grid).
4. Loss = λ_cls L_cls + λ_mim L_mim (+ λ_c L_contrastive):
   L_cls: cross-entropy between the teacher's centred, sharpened [CLS] distribution of each
   global crop and the student's [CLS] distribution of every *other* crop (2(V-1) pairs);
   L_mim: cross-entropy at the masked patches of the same global crop, averaged per image over
   its masked patches (unmasked images count as 0);
   L_contrastive (§5.4, fixed): InfoNCE on the student's patch distributions, anchors and
   positives at the k most-attended patches of both crops, negatives at the k least-attended.
5. Centres are updated with momentum; after the optimizer step the teacher follows the
   student by EMA with a cosine momentum schedule; the last head layer is frozen during the
   first ``freeze_last_layer`` epochs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mimkit.attention import capture_attention
from mimkit.errors import ConfigError
from mimkit.masking import (
    ATTENTION_SCORES, MASK_STRATEGIES, attention_score_layers, attention_scores, mask_noise_size, strategy_mask,
    uniform_noise,
)
from mimkit.methods.base import StepOutput
from mimkit.methods.ema import copy_into_teacher_, ema_update_, freeze_
from mimkit.models.vit import MaskedViT

_MASK_STREAM = 100  # sample_uniform stream of global crop q is _MASK_STREAM + q


class IBOTHead(nn.Module):
    """DINO-style projection head applied to every token.

    MLP in -> hidden (-> hidden ...) -> bottleneck with GELU, L2-normalised, then a
    weight-normalised Linear(bottleneck -> out_dim, no bias) for [CLS]. Patch tokens use the
    same last layer (``patch_out_dim=None``, iBOT's ``shared_head``) or a second one.
    ``norm_last_layer`` fixes the weight-norm gain at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        patch_out_dim: int | None = None,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_trunc_normal)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = (
            _weight_normed_linear(bottleneck_dim, patch_out_dim, norm_last_layer) if patch_out_dim is not None else None
        )

    def last_layers(self) -> list[nn.Module]:
        return [m for m in (self.last_layer, self.last_layer2) if m is not None]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., D] -> L2-normalised bottleneck [..., bottleneck_dim]."""
        return F.normalize(self.mlp(tokens), dim=-1, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, 1+L, D] -> ([CLS] logits [N, out_dim], patch logits [N, L, patch_out_dim])."""
        z = self.project(tokens)
        patch_layer = self.last_layer2 if self.last_layer2 is not None else self.last_layer
        return self.last_layer(z[:, 0]), patch_layer(z[:, 1:])

    def cls_logits(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, out_dim] (local crops need only [CLS])."""
        return self.last_layer(self.project(cls_tokens))


def _init_trunc_normal(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _weight_normed_linear(in_dim: int, out_dim: int, fixed_gain: bool) -> nn.Module:
    layer = nn.Linear(in_dim, out_dim, bias=False)
    _init_trunc_normal(layer)
    layer = weight_norm(layer)
    gain = layer.parametrizations.weight.original0
    with torch.no_grad():
        gain.fill_(1.0)
    gain.requires_grad_(not fixed_gain)
    return layer


def _per_crop(value, name: str) -> list:
    """A single setting, or one per global crop (a list of 2)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(values) != 2:
        raise ConfigError(f"model.{name} needs one value or one per global crop (2), got {value!r}.")
    return values


def teacher_probabilities(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution softmax((logits - center) / T), float32, detached."""
    return F.softmax((logits.float() - center) / temperature, dim=-1).detach()


def attention_contrastive_loss(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    scores: torch.Tensor,
    k_anchors: int,
    temperature: float,
) -> torch.Tensor:
    """The contrastive third term (methods.md §5.4) in its intended InfoNCE form, trainable.

    student_probs, teacher_probs: [Q, N, L, K] patch distributions of the Q global crops
    (teacher detached); scores: [Q, N, L] attention saliency. Per image, the k most- and the
    k least-attended patches of every crop are picked (2k each over 2 crops). Anchors a_i are
    the student's distributions at the most-attended patches, positives p_j the teacher's at
    the other most-attended patches (j != i), negatives n_m the teacher's at the least-attended
    ones, all L2-normalised:

        loss = mean_{t, i != j} -log[ exp(<a_i,p_j>/τ) / (exp(<a_i,p_j>/τ) + Σ_m exp(<a_i,n_m>/τ)) ]

    The original used only the teacher's (detached) outputs, so it had no gradient.
    """
    q, n, length, k_dim = student_probs.shape
    k = min(k_anchors, length // 2)
    high = scores.topk(k, dim=-1).indices  # [Q, N, k]
    low = scores.topk(k, dim=-1, largest=False).indices

    def pick(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # -> [N, Q*k, K]
        picked = probs.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, k_dim))  # [Q, N, k, K]
        return F.normalize(picked.permute(1, 0, 2, 3).reshape(n, q * k, k_dim), dim=-1)

    anchors, positives, negatives = pick(student_probs, high), pick(teacher_probs, high), pick(teacher_probs, low)
    pos = anchors @ positives.transpose(1, 2) / temperature  # [N, 2k, 2k]
    neg = torch.logsumexp(anchors @ negatives.transpose(1, 2) / temperature, dim=-1, keepdim=True)  # [N, 2k, 1]
    nll = torch.logaddexp(pos, neg) - pos
    off_diagonal = ~torch.eye(q * k, dtype=torch.bool, device=nll.device)
    return nll[:, off_diagonal].mean()


class IBOT(nn.Module):
    """iBOT student/teacher pair with attention-guided masking.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the ViT; global
            crops have ``img_size`` pixels.
        drop_path_rate: student stochastic depth (teacher: none).
        out_dim, patch_out_dim: head output sizes ([CLS] / patches); equal when ``shared_head``.
        shared_head: one last layer for [CLS] and patch tokens (the recipe's setting).
        head_hidden_dim, head_bottleneck_dim, head_layers: head MLP.
        norm_last_layer: fix the last layer's weight-norm gain at 1.
        student_temp: τ_s. teacher_temp / teacher_patch_temp: final τ_t / τ_t', reached linearly
            from warmup_teacher_temp / warmup_teacher_patch_temp over warmup_teacher_temp_epochs.
        center_momentum: centring momentum (c <- m c + (1 - m) batch mean).
        momentum_teacher: EMA momentum at step 0, cosine to 1 over ``total_epochs``.
        total_epochs: length of the momentum schedule; ``mimkit pretrain`` sets it to train.epochs
            unless the config gives it (e.g. to stop early inside a longer schedule).
        freeze_last_layer: epochs during which the last head layer gets no update.
        lambda_cls, lambda_mim: loss weights.
        local_crop_size, num_local_crops, global_crop_scale, local_crop_scale,
            photometric_augment: multi-crop (see :class:`mimkit.data.multicrop.MultiCropTransform`).
        mask_strategy: one of random, block, attmask_high, attmask_low, attmask_hint; a list
            gives one per global crop.
        mask_scores: attention score for AttMask and the contrastive term: raw, log, power,
            rollout_all, rollout_last, rollout_middle (one or one per crop).
        mask_layers: block whose attention raw/log/power use (negative = from the end; one or
            one per crop: the seed's "multi-layer" masks, e.g. [11, 4]).
        mask_power: exponent of the ``power`` score.
        mask_ratio_range: [low, high] range of the per-image masking ratio.
        mask_prob: probability that an image is masked at all (iBOT/AttMask: 0.5).
        hint_ratio: AttMask-hint reveals this fraction of the masked count.
        contrastive_weight: λ of the contrastive term (0 = off).
        contrastive_k_anchors, contrastive_temperature: k and τ_c of that term.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        out_dim: int = 8192,
        patch_out_dim: int = 8192,
        shared_head: bool = True,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = False,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 1.0,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.99,
        total_epochs: int = 100,
        freeze_last_layer: float = 1.0,
        lambda_cls: float = 1.0,
        lambda_mim: float = 1.0,
        local_crop_size: int = 96,
        num_local_crops: int = 6,
        global_crop_scale: list[float] = (0.25, 1.0),
        local_crop_scale: list[float] = (0.05, 0.25),
        photometric_augment: bool = True,
        mask_strategy: str | list[str] = "block",
        mask_scores: str | list[str] = "raw",
        mask_layers: int | list[int] = -1,
        mask_power: float = 0.5,
        mask_ratio_range: list[float] = (0.1, 0.5),
        mask_prob: float = 0.5,
        hint_ratio: float = 0.1,
        contrastive_weight: float = 0.0,
        contrastive_k_anchors: int = 3,
        contrastive_temperature: float = 0.2,
    ) -> None:
        super().__init__()
        if local_crop_size % patch_size:
            raise ConfigError(f"model.local_crop_size {local_crop_size} is not divisible by the patch size {patch_size}.")
        self.mask_strategy = _per_crop(mask_strategy, "mask_strategy")
        self.mask_scores = _per_crop(mask_scores, "mask_scores")
        self.mask_layers = [int(x) for x in _per_crop(mask_layers, "mask_layers")]
        for s in self.mask_strategy:
            if s not in MASK_STRATEGIES:
                raise ConfigError(f"model.mask_strategy {s!r} is unknown: choose one of {', '.join(MASK_STRATEGIES)}.")
        for s in self.mask_scores:
            if s not in ATTENTION_SCORES:
                raise ConfigError(f"model.mask_scores {s!r} is unknown: choose one of {', '.join(ATTENTION_SCORES)}.")
        lo, hi = (float(x) for x in mask_ratio_range)
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"model.mask_ratio_range must be [low, high] with 0 <= low <= high < 1, got {list(mask_ratio_range)}.")
        self.mask_ratio_range, self.mask_prob, self.mask_power, self.hint_ratio = (lo, hi), mask_prob, mask_power, hint_ratio
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.local_crop_size, self.num_local_crops = local_crop_size, num_local_crops
        self.global_crop_scale, self.local_crop_scale = list(global_crop_scale), list(local_crop_scale)
        self.photometric_augment = photometric_augment
        self.student_temp = student_temp
        self.teacher_temps = (warmup_teacher_temp, teacher_temp)
        self.teacher_patch_temps = (warmup_teacher_patch_temp, teacher_patch_temp)
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum, self.momentum_teacher, self.total_epochs = center_momentum, momentum_teacher, total_epochs
        self.freeze_last_layer = freeze_last_layer
        self.lambda_cls, self.lambda_mim = lambda_cls, lambda_mim
        self.contrastive_weight = contrastive_weight
        self.contrastive_k_anchors, self.contrastive_temperature = contrastive_k_anchors, contrastive_temperature

        vit = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                   num_heads=num_heads, mlp_ratio=mlp_ratio)
        patch_dim = None if shared_head else patch_out_dim
        head = dict(in_dim=embed_dim, out_dim=out_dim, hidden_dim=head_hidden_dim, bottleneck_dim=head_bottleneck_dim,
                    num_layers=head_layers, norm_last_layer=norm_last_layer, patch_out_dim=patch_dim)
        self.student = MaskedViT(**vit, drop_path_rate=drop_path_rate, use_mask_token=True)
        self.student_head = IBOTHead(**head)
        self.teacher = MaskedViT(**vit)
        self.teacher_head = IBOTHead(**head)
        # The teacher starts as a copy of the student (no mask token) and is never optimised.
        copy_into_teacher_(self.teacher_pairs())
        freeze_((self.teacher, self.teacher_head))
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("patch_center", torch.zeros(1, out_dim if shared_head else patch_out_dim))
        self._progress = 0.0
        self.depth, self.grid_size, self.num_patches = depth, self.student.grid_size, self.student.num_patches

    # -- engine hooks --------------------------------------------------------------------------
    @property
    def encoder(self) -> MaskedViT:
        """The encoder evaluated by default: the teacher (iBOT/DINO protocol)."""
        return self.teacher

    def eval_encoders(self) -> dict[str, MaskedViT]:
        return {"teacher": self.teacher, "student": self.student}

    def no_weight_decay(self) -> set[str]:
        names = {f"student.{n}" for n in self.student.no_weight_decay()}
        for name, _ in self.student_head.named_parameters():
            if name.endswith("original0"):  # weight-norm gains
                names.add(f"student_head.{name}")
        return names

    def pretrain_transform(self, img_size: int, mean, std, data_cfg):
        from mimkit.data.multicrop import MultiCropTransform

        return MultiCropTransform(
            self.in_chans, img_size, self.local_crop_size, self.num_local_crops, mean, std,
            global_scale=self.global_crop_scale, local_scale=self.local_crop_scale,
            photometric=self.photometric_augment, hflip=data_cfg.hflip, interpolation=data_cfg.interpolation,
        )

    def set_epoch(self, progress: float) -> None:
        self._progress = float(progress)

    def teacher_temperatures(self, progress: float | None = None) -> tuple[float, float]:
        """(τ_t, τ_t') at fractional epoch ``progress``: linear warm-up, then constant."""
        progress = self._progress if progress is None else progress
        w = 1.0 if self.warmup_teacher_temp_epochs <= 0 else min(1.0, progress / self.warmup_teacher_temp_epochs)
        (a0, a1), (b0, b1) = self.teacher_temps, self.teacher_patch_temps
        return a0 + (a1 - a0) * w, b0 + (b1 - b0) * w

    def teacher_momentum(self, progress: float) -> float:
        """Cosine from ``momentum_teacher`` to 1 over ``total_epochs``."""
        t = min(1.0, max(0.0, progress / max(self.total_epochs, 1e-9)))
        return 1.0 - (1.0 - self.momentum_teacher) * (math.cos(math.pi * t) + 1) / 2

    def before_optimizer_step(self, progress: float) -> None:
        """Drop the last head layer's gradients during the first ``freeze_last_layer`` epochs."""
        if progress <= self.freeze_last_layer:
            for layer in self.student_head.last_layers():
                for p in layer.parameters():
                    p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        self.update_teacher(self.teacher_momentum(progress))

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher, student) module pairs the EMA couples: encoders and heads."""
        return [(self.teacher, self.student), (self.teacher_head, self.student_head)]

    def update_teacher(self, momentum: float) -> None:
        """EMA: θ_t <- m θ_t + (1 - m) θ_s for every teacher parameter (the student's namesake)."""
        ema_update_(self.teacher_pairs(), momentum)

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean(t_cls); c' <- m c' + (1 - m) mean over images of mean over patches.

        teacher_cls [M, K], teacher_patch [M, L, K'] (raw teacher logits). Averaged over all
        processes when running distributed.
        """
        cls_mean = teacher_cls.float().mean(dim=0, keepdim=True)
        patch_mean = teacher_patch.float().mean(dim=1).mean(dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stacked = torch.cat([cls_mean, patch_mean], dim=1)
            torch.distributed.all_reduce(stacked)
            stacked /= torch.distributed.get_world_size()
            cls_mean, patch_mean = stacked.split([cls_mean.shape[1], patch_mean.shape[1]], dim=1)
        m = self.center_momentum
        self.center.mul_(m).add_(cls_mean, alpha=1 - m)
        self.patch_center.mul_(m).add_(patch_mean, alpha=1 - m)

    # -- masks ---------------------------------------------------------------------------------
    def crop_needs_scores(self, q: int) -> bool:
        """Whether global crop q needs its attention score: an AttMask strategy or the contrastive term."""
        return self.mask_strategy[q].startswith("attmask_") or self.contrastive_weight > 0

    def attention_layers_needed(self) -> list[int]:
        """Teacher blocks whose attention the masks (or the contrastive term) need."""
        layers: set[int] = set()
        for q in range(2):
            if self.crop_needs_scores(q):
                layers.update(attention_score_layers(self.mask_scores[q], self.mask_layers[q], self.depth))
        return sorted(layers)

    def crop_scores(self, attentions: dict[int, torch.Tensor], q: int, batch: int) -> torch.Tensor:
        """[N, L] attention saliency of global crop q from the teacher's maps of both crops."""
        own = {i: a[q * batch:(q + 1) * batch] for i, a in attentions.items()}
        return attention_scores(own, self.mask_scores[q], layer=self.mask_layers[q], depth=self.depth,
                                power=self.mask_power)

    def draw_masks(
        self, attentions: dict[int, torch.Tensor], batch: int, sample_seeds: torch.Tensor | None, device
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Masks of both global crops [2N, L] bool (crop 1 rows first) and their scores ([N, L] or None).

        A crop gets a score only when it needs one (:meth:`crop_needs_scores`): with per-crop
        layers, ``attentions`` holds only the blocks of the crops that do.
        """
        length = self.num_patches
        masks, scores = [], []
        lo, hi = self.mask_ratio_range
        for q in range(2):
            strategy = self.mask_strategy[q]
            u = uniform_noise(sample_seeds, batch, 2 + mask_noise_size(strategy, length), _MASK_STREAM + q, device)
            count = torch.floor(length * (lo + (hi - lo) * u[:, 0])).long()
            count = torch.where(u[:, 1] < self.mask_prob, count, torch.zeros_like(count))
            s = self.crop_scores(attentions, q, batch) if self.crop_needs_scores(q) else None
            masks.append(strategy_mask(strategy, count, self.grid_size, u[:, 2:], s, hint_ratio=self.hint_ratio))
            scores.append(s)
        return torch.cat(masks), scores

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: Sequence[torch.Tensor], sample_seeds: torch.Tensor | None = None) -> StepOutput:
        """images: [global_1 [N, C, G, G], global_2, local_1 [N, C, S, S], ...] (G = img_size)."""
        if isinstance(images, torch.Tensor) or len(images) < 2:
            raise ValueError("iBOT needs a list of crops [global_1, global_2, local_1, ...] (its pretrain_transform)")
        n = images[0].shape[0]
        globals_ = torch.cat(list(images[:2]))
        tau_t, tau_tp = self.teacher_temperatures()

        with torch.no_grad():
            layers = self.attention_layers_needed()
            with capture_attention(self.teacher, layers) as attentions:
                t_tokens = self.teacher.encode(globals_).tokens
            t_cls, t_patch = self.teacher_head(t_tokens)
            masks, scores = self.draw_masks(attentions, n, sample_seeds, globals_.device)
            p_cls = teacher_probabilities(t_cls, self.center, tau_t)  # [2N, K]
            p_patch = teacher_probabilities(t_patch, self.patch_center, tau_tp)  # [2N, L, K']

        s_cls, s_patch = self.student_head(self.student.encode(globals_, mask=masks).tokens)
        student_cls = [s_cls]
        if len(images) > 2:  # local crops: unmasked, [CLS] only
            local_tokens = self.student.encode(torch.cat(list(images[2:]))).tokens[:, 0]
            student_cls.append(self.student_head.cls_logits(local_tokens))
        log_s_cls = F.log_softmax(torch.cat(student_cls).float() / self.student_temp, dim=-1)
        views = log_s_cls.shape[0] // n

        # [CLS]: teacher view q vs student view v, all pairs with v != q.
        ce = -torch.einsum("qnk,vnk->qv", p_cls.view(2, n, -1), log_s_cls.view(views, n, -1)) / n  # [2, V]
        off_diagonal = torch.ones_like(ce, dtype=torch.bool)
        off_diagonal[0, 0] = off_diagonal[1, 1] = False
        loss_cls = ce[off_diagonal].mean()

        # Masked patches of the same view, averaged per image over its masked patches.
        log_s_patch = F.log_softmax(s_patch.float() / self.student_temp, dim=-1)
        patch_ce = -(p_patch * log_s_patch).sum(dim=-1)  # [2N, L]
        m = masks.float()
        loss_mim = ((patch_ce * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)).mean()

        loss = self.lambda_cls * loss_cls + self.lambda_mim * loss_mim
        metrics = {"loss_cls": loss_cls.detach(), "loss_mim": loss_mim.detach(), "mask_ratio": m.mean()}
        if self.contrastive_weight > 0:
            length = self.num_patches
            loss_con = attention_contrastive_loss(
                log_s_patch.exp().view(2, n, length, -1), p_patch.view(2, n, length, -1), torch.stack(scores),
                self.contrastive_k_anchors, self.contrastive_temperature,
            )
            loss = loss + self.contrastive_weight * loss_con
            metrics["loss_contrastive"] = loss_con.detach()
        if self.training:
            self.update_centers(t_cls, t_patch)
        metrics["loss"] = loss.detach()
        return StepOutput(loss, metrics)


__all__ = ["IBOT", "IBOTHead", "attention_contrastive_loss", "teacher_probabilities"]
