"""Hugging Face checkpoints in and out (``msa-convert --from-hf`` / ``--to-hf``); see
docs/conversion.md. Needs the ``hf`` extra (safetensors; transformers for the tests)."""

from .arch import FAMILIES, HFArch, UnsupportedModelError
from .convert import export_hf, import_hf

__all__ = ["FAMILIES", "HFArch", "UnsupportedModelError", "export_hf", "import_hf"]
