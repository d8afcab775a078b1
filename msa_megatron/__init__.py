"""msa_megatron: MiniMax Sparse Attention (arXiv 2606.13392) for Megatron-Core pretraining.

``import msa_megatron`` is light: it loads the config and the reference. The Megatron-Core
backend registers itself through :func:`register` (imported lazily, so the reference and
the kernels stay usable without megatron-core)."""

from .config import ATTENTION_MODES, ConfigError, MSAConfig, MSAConfigError
from .versions import warn_if_untested

__version__ = "0.1.0"

warn_if_untested()  # once, if torch / triton / megatron-core are outside the tested ranges (versions.py)


def register() -> None:
    """Make Megatron-Core accept experimental_attention_variant='msa' (imports megatron-core; idempotent)."""
    from .megatron.registry import register as _register

    _register()


__all__ = ["ATTENTION_MODES", "ConfigError", "MSAConfig", "MSAConfigError", "__version__", "register"]
