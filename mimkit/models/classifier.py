"""The supervised classifier that fine-tuning trains: a pretrained ViT, pooled features, a linear head.

The classifier is the pretrained ViT plus global average pooling of the patch tokens and a fresh
``fc_norm`` LayerNorm (the pretrained final norm is dropped, as in MAE), or the [CLS] token after
the pretrained norm (``global_pool=False``), then a linear head initialised with std 2e-5.
Parameter names are timm's, so a fine-tuned mimkit checkpoint is also a timm ViT state dict.

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


class ViTClassifier(MaskedViT):
    """Pretrained ViT + pooled features + linear head; ``forward`` is a supervised training step.

    Args (beyond :class:`MaskedViT`'s): num_classes; global_pool (mean patch token + fc_norm,
    else [CLS] after norm); head_init_std; layer_decay (lr scale decay^(depth+1-layer), §0.7).
    """

    uses_labels = True  # the engine passes labels to forward

    def __init__(self, num_classes: int, global_pool: bool = True, head_init_std: float = 2e-5,
                 layer_decay: float = 0.75, **vit_kwargs: Any) -> None:
        super().__init__(learnable_pos_embed=True, **vit_kwargs)
        self.num_classes, self.global_pool, self.layer_decay = num_classes, global_pool, layer_decay
        if global_pool:
            self.norm = nn.Identity()  # MAE drops the pretrained final norm and learns fc_norm instead
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        self.mixup_fn: Callable | None = None
        self.criterion: nn.Module = nn.CrossEntropyLoss()

    def configure_training(self, mixup_fn: Callable | None, criterion: nn.Module) -> None:
        self.mixup_fn, self.criterion = mixup_fn, criterion

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D] (after fc_norm)."""
        tokens = self.encode(images).tokens
        return self.fc_norm(tokens[:, 1:].mean(dim=1) if self.global_pool else tokens[:, 0])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, num_classes]."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor, sample_seeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> StepOutput:
        if labels is None:
            raise ValueError("ViTClassifier.forward is a training step: pass labels (use .logits() to predict)")
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
        """timm layer-decay groups (each carries ``lr_scale``; 1-D params and tokens get no decay)."""
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(self, weight_decay, no_weight_decay_list=tuple(self.no_weight_decay()),
                                        layer_decay=self.layer_decay)


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
