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
from timm.models import adapt_input_conv
from torch import nn

from mimkit.checkpoint import encoder_state, extract_state_dict, load_state_dict_checked
from mimkit.errors import CheckpointError
from mimkit.methods.base import StepOutput
from mimkit.models.pos_embed import interpolate_pos_embed
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

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping: stem = layer 0, block k = layer k+1, the rest (norm, fc_norm, head) = depth+1.

        (timm's own ViT matcher merges the final norm into the last block; MAE/BEiT give it the head's layer.)
        """
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^masked_embed", blocks=[(r"^blocks\.(\d+)", None)])

    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """timm layer-decay groups (each carries ``lr_scale``; 1-D params and tokens get no decay)."""
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(self, weight_decay, no_weight_decay_list=tuple(self.no_weight_decay()),
                                        layer_decay=self.layer_decay)


# -- weights -------------------------------------------------------------------------------------
def transfer_encoder_weights(source: nn.Module, target: ViTClassifier, log=print) -> None:
    """Copy a pretrained encoder into ``target``, adapting the position table and input channels."""
    state = encoder_state(source)
    pos = state["pos_embed"]
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if (old, old) != tuple(target.grid_size):  # the grid decides, not the row count
        log(f"position table interpolated (bicubic) from a {old}x{old} to a "
            f"{target.grid_size[0]}x{target.grid_size[1]} patch grid")
        state["pos_embed"] = interpolate_pos_embed(pos, target.grid_size)
    weight = state["patch_embed.proj.weight"]
    if weight.shape[1] != target.in_chans:
        how = "summed over" if target.in_chans == 1 else f"repeated and scaled by {weight.shape[1]}/{target.in_chans} from"
        log(f"patch embedding adapted from {weight.shape[1]} to {target.in_chans} input channels "
            f"(kernel {how} the checkpoint's channels, timm adapt_input_conv)")
        state["patch_embed.proj.weight"] = adapt_input_conv(target.in_chans, weight, base_chans=weight.shape[1])
    if target.global_pool:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    if target.masked_embed is None:
        state.pop("masked_embed", None)
    load_state_dict_checked(target, state, "The pretrained encoder", strict=False)
    missing = [k for k in target.state_dict() if k not in state and not k.startswith(("head.", "fc_norm.", "masked_embed"))]
    if missing:
        raise CheckpointError(f"The pretrained encoder lacks {len(missing)} weights of the classifier "
                              f"(e.g. {', '.join(missing[:3])}): is it a ViT checkpoint?")


def build_classifier_from_checkpoint(obj: dict[str, Any], what: str) -> ViTClassifier:
    """Rebuild a fine-tuned mimkit classifier (``task: finetune``) and load its weights."""
    kwargs = {k: v for k, v in obj["model_config"].items() if k != "name"}
    model = ViTClassifier(**kwargs)
    load_state_dict_checked(model, extract_state_dict(obj), f"Checkpoint {what}")
    return model.eval()
