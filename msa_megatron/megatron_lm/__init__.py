"""MSA in Megatron-LM's training loop (``megatron.training``, shipped in the megatron-core wheel).

``install()`` makes Megatron-LM's ``pretrain`` MSA-aware, with the version-pinned patches in
``msa_megatron/patches/mcore_019_training_*.py`` (idempotent):

* ``--experimental-attention-variant msa`` and the ``--msa-*`` flags (generated from MSAConfig),
  validated with Megatron's arguments; the same settings in ``--yaml-cfg`` files;
* the warmup schedule (``msa_warmup`` then ``msa``) and selection-recall sampling applied before each
  ``train_step``;
* MSA metrics in ``training_log``: TensorBoard, wandb and the iteration line;
* ``pretrain`` starting from the megatron-core wheel (its dataset-helper build step cannot run
  there; ``msa_megatron/patches/mcore_019_training_helpers.py``).

It also runs :func:`msa_megatron.register` (Megatron-Core builds MSA layers for the variant).
The model config comes from :func:`gpt_model_config_from_args` (``scripts/pretrain_gpt_msa.py``).

Modules: ``args`` (flags <-> MSAConfig), ``yaml_args`` (YAML keys), ``model`` (args -> configs),
``schedule`` (per-iteration plan), ``hooks`` (what the loop patches call), ``run_summary``
(checks a finished run from its logs, TensorBoard events and offline wandb runs).
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("msa_megatron.megatron_lm")

#: The training-loop patches, in the order install() applies them.
PATCHES = tuple(f"msa_megatron.patches.mcore_019_training_{name}" for name in ("args", "yaml", "loop", "helpers"))

_EXPORTS = {
    "gpt_model_config_from_args": "model",
    "transformer_config_from_args": "model",
    "MSAArgumentError": "args",
    "MSASchedule": "schedule",
    "MSATrainingHooks": "hooks",
}


def install() -> None:
    """Register MSA with Megatron-Core and patch Megatron-LM's training loop (idempotent)."""
    from .. import register

    register()
    modules = [importlib.import_module(name) for name in PATCHES]
    applied = [m.__name__.rsplit(".", 1)[1] for m in modules if m.apply()]
    if applied:
        log.warning("MSA: Megatron-LM training loop patched (%s)", ", ".join(applied))


def is_installed() -> bool:
    modules = [importlib.import_module(name) for name in PATCHES]
    return all(m.is_applied() for m in modules)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PATCHES", "install", "is_installed", *sorted(_EXPORTS)]
