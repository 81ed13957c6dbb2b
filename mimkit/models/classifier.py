"""The supervised classifiers that fine-tuning trains: a pretrained encoder, pooled features, a head.

:class:`SupervisedClassifier` is the part every encoder family shares: the head on the pooled
features, the supervised step (Mixup/CutMix, criterion) and the layer-decay parameter groups.
A family's classifier is its encoder class plus this base; it only says how it pools
(:meth:`SupervisedClassifier.features`). :class:`ViTClassifier` is the ViT one: global average
pooling of the patch tokens and a fresh ``fc_norm`` LayerNorm (the pretrained final norm is
dropped, as in MAE), or the [CLS] token after the pretrained norm (``global_pool=False``).

Heads (``head``), on pooled features [N, D]:

* ``linear`` (default): one Linear, weights trunc-normal ``head_init_std`` (2e-5, MAE), bias 0.
  Named as timm names it, so a fine-tuned checkpoint is also a timm state dict: ``head`` for
  ViT, ``head.fc`` for Swin (``linear_head_in_holder``).
* ``mlp``: DDMIM's head (methods.md §3.6), :class:`MLPHead`: ``head.norm`` BatchNorm1d(D) ->
  ``head.fc1`` Linear(D, head_hidden_dim) -> GELU -> ``head.fc2`` Linear(head_hidden_dim, classes),
  the same names in every family (timm has no such head).

Rules for a pretrained encoder that does not match (:func:`transfer_encoder_weights`):

* another image size: the position table is interpolated bicubically (methods.md §0.11);
* another channel count: the patch-embedding kernel is adapted with timm ``adapt_input_conv``
  (to 1 channel: summed over the checkpoint's channels; to N channels: the checkpoint's channels
  repeated and scaled by C_ckpt / N). What was done is logged.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mimkit.checkpoint import encoder_state, load_state_dict_checked
from mimkit.errors import CheckpointError
from mimkit.methods.base import StepOutput
from mimkit.models.vit import MaskedViT

HEADS = ("linear", "mlp")


class MLPHead(nn.Module):
    """DDMIM's classifier head: [N, in_dim] -> BatchNorm1d -> Linear -> GELU -> Linear -> [N, num_classes].

    ``fc1`` starts trunc-normal 0.02 (timm's Linear init), ``fc2`` trunc-normal ``init_std`` so the
    first logits are near zero, as the linear head's; biases start at zero, the norm at (1, 0).
    ``trunc_normal`` draws the weights (the family's initialiser).
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, init_std: float,
                 trunc_normal: Callable = nn.init.trunc_normal_) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, num_classes)
        for fc, std in ((self.fc1, 0.02), (self.fc2, init_std)):
            trunc_normal(fc.weight, std=std)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class _FcHolder(nn.Module):
    """Holds the linear head as ``fc``, so its weights are named ``head.fc.*`` (timm's ClassifierHead)."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def build_head(kind: str, in_dim: int, num_classes: int, *, hidden_dim: int, init_std: float,
               in_holder: bool = False, trunc_normal: Callable = nn.init.trunc_normal_) -> nn.Module:
    """A classifier head [N, in_dim] -> [N, num_classes] of ``kind`` (see the module docstring);
    ``in_holder`` names the linear head's weights ``fc.*``; ``trunc_normal`` draws the weights."""
    if kind not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    if kind == "mlp":
        return MLPHead(in_dim, hidden_dim, num_classes, init_std, trunc_normal)
    fc = nn.Linear(in_dim, num_classes)
    trunc_normal(fc.weight, std=init_std)
    nn.init.zeros_(fc.bias)
    return _FcHolder(fc) if in_holder else fc


class SupervisedClassifier(nn.Module):
    """The classifier part shared by every encoder family: head, supervised step, optimiser groups.

    Used as the first base of ``class XClassifier(SupervisedClassifier, XEncoder)``; the encoder's
    ``__init__`` runs, then the subclass calls :meth:`init_classifier`. A subclass provides
    :meth:`features` (pooled features [N, D]); the encoder provides ``group_matcher`` and
    ``no_weight_decay`` (the encoder contract), which the layer-decay groups use.
    """

    uses_labels = True  # the engine passes labels to forward
    linear_head_in_holder = False  # True: the linear head is named head.fc (timm's Swin), else head
    # torch's and timm's trunc-normal draw differently from the same seed: each family keeps the one
    # it always used, so runs from before the shared base reproduce bit for bit.
    head_trunc_normal: Callable = staticmethod(nn.init.trunc_normal_)

    def init_classifier(self, num_classes: int, in_dim: int, *, head: str, head_hidden_dim: int,
                        head_init_std: float, layer_decay: float) -> None:
        """Build the head on [N, in_dim] features and the default criterion (plain cross-entropy, no mixup)."""
        self.num_classes, self.layer_decay = num_classes, layer_decay
        self.head_kind, self.head_hidden_dim = head, head_hidden_dim
        self.head = build_head(head, in_dim, num_classes, hidden_dim=head_hidden_dim, init_std=head_init_std,
                               in_holder=self.linear_head_in_holder, trunc_normal=self.head_trunc_normal)
        self.mixup_fn: Callable | None = None
        self.criterion: nn.Module = nn.CrossEntropyLoss()

    def configure_training(self, mixup_fn: Callable | None, criterion: nn.Module) -> None:
        self.mixup_fn, self.criterion = mixup_fn, criterion

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D], the head's input."""
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, num_classes]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> StepOutput:
        """One supervised step: images [N, C, H, W], labels [N] -> loss and train accuracy."""
        if labels is None:
            raise ValueError(f"{type(self).__name__}.forward is a training step: pass labels (use .logits() to "
                             f"predict)")
        targets = labels
        if self.mixup_fn is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from the batch's sample seeds so a
            # resumed run mixes exactly as an uninterrupted one.
            seed = 0 if sample_seeds is None else int(sample_seeds.sum().item() % (2**32))
            state = np.random.get_state()
            np.random.seed(seed)
            images, targets = self.mixup_fn(images, labels)
            np.random.set_state(state)
        logits = self.logits(images)
        loss = self.criterion(logits, targets)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return StepOutput(loss, {"loss": loss.detach(), "train_acc": acc.detach()})

    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """timm layer-decay groups over the encoder's ``group_matcher`` (each carries ``lr_scale``).

        The head (any kind) matches no encoder group, so timm puts it in the last layer (lr scale 1);
        1-D parameters (biases, norms, the head's BatchNorm) and ``no_weight_decay()`` get no decay.
        """
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(self, weight_decay, no_weight_decay_list=tuple(self.no_weight_decay()),
                                        layer_decay=self.layer_decay)


class ViTClassifier(SupervisedClassifier, MaskedViT):
    """Pretrained ViT + pooled features + a head; ``forward`` is a supervised training step.

    Args (beyond :class:`MaskedViT`'s): num_classes; global_pool (mean patch token + fc_norm,
    else [CLS] after norm); head_init_std; layer_decay (lr scale decay^(depth+1-layer), §0.7);
    head (linear | mlp) and head_hidden_dim (the mlp's hidden width), see the module docstring.
    """

    def __init__(self, num_classes: int, global_pool: bool = True, head_init_std: float = 2e-5,
                 layer_decay: float = 0.75, head: str = "linear", head_hidden_dim: int = 1024,
                 **vit_kwargs: Any) -> None:
        super().__init__(learnable_pos_embed=True, **vit_kwargs)
        self.global_pool = global_pool
        if global_pool:
            self.norm = nn.Identity()  # MAE drops the pretrained final norm and learns fc_norm instead
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.init_classifier(num_classes, self.embed_dim, head=head, head_hidden_dim=head_hidden_dim,
                             head_init_std=head_init_std, layer_decay=layer_decay)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D] (after fc_norm)."""
        tokens = self.encode(images).tokens
        return self.fc_norm(tokens[:, 1:].mean(dim=1) if self.global_pool else tokens[:, 0])

    def adapt_state_dict(self, state: dict[str, torch.Tensor], log: Callable[[str], None] = print
                         ) -> dict[str, torch.Tensor]:
        """The encoder's adaptation (position table, channels); global pooling drops the pretrained norm."""
        state = super().adapt_state_dict(state, log)
        if self.global_pool:
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        return state


# -- weights (any family: through the encoder contract's adapt_state_dict) ------------------------
_NEW_IN_CLASSIFIERS = ("head.", "fc_norm.", "masked_embed", "mask_token")


def transfer_encoder_weights(source: nn.Module, target: nn.Module, log=print) -> None:
    """Copy a pretrained encoder into the classifier ``target`` of its family, adapted to fit."""
    state = target.adapt_state_dict(encoder_state(source), log)
    load_state_dict_checked(target, state, "The pretrained encoder", strict=False)
    missing = [k for k in target.state_dict() if k not in state and not k.startswith(_NEW_IN_CLASSIFIERS)]
    if missing:
        raise CheckpointError(f"The pretrained encoder lacks {len(missing)} weights of the classifier "
                              f"(e.g. {', '.join(missing[:3])}): is it a {target.family} checkpoint?")
