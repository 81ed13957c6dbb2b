"""mimkit: masked image modeling toolkit (MAE and friends) on current PyTorch and timm."""

__version__ = "0.1.0"

from mimkit.registry import create_model, list_models  # noqa: E402

__all__ = ["create_model", "list_models", "__version__"]
