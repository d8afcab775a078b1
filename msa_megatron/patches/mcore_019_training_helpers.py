"""Let Megatron-LM's ``pretrain`` start from the megatron-core wheel (megatron-core 0.19.x).

``initialize_megatron`` calls ``megatron.training.initialize._compile_dependencies``, whose rank 0
runs ``make -C <site-packages>/megatron/core/datasets`` to build the dataset index helpers and
``sys.exit(1)``s when make fails. The 0.19.2 wheel ships the helpers prebuilt
(``megatron/core/datasets/helpers_cpp.*.so``) but no Makefile, so ``make`` always fails and every
``pretrain`` run from the wheel exits during initialisation (found while writing this
integration, not MSA-specific).

The wrapper skips the make step exactly when there is nothing to make: no Makefile next to
``helpers.cpp`` *and* the prebuilt ``helpers_cpp`` imports (logged once); it keeps the upstream
barrier. Otherwise (a source checkout with its Makefile, or no usable prebuilt module) it calls the
upstream function unchanged.

Relied on (pinned): ``initialize_megatron`` calls ``_compile_dependencies`` through module globals,
and ``_compile_dependencies`` compiles nothing but the dataset helpers.
"""

from __future__ import annotations

import functools
import logging
import os

from msa_megatron.patches.mcore_019_training_base import FunctionWrapPatch

TARGET = "megatron.training.initialize"
log = logging.getLogger("msa_megatron.patches")

#: sha256 of the upstream sources this patch wraps or relies on (megatron-core 0.19.2).
PINNED = {
    f"{TARGET}:_compile_dependencies": "6d4b2069952d6210042f79b51e54042213e8be164e1f02eaed2e7eca8c0f3b11",
    f"{TARGET}:initialize_megatron": "d9b467adcaed1325932422670da7ee3b374bcd0f07f2f329780b54d41ca829c7",
}
SOURCE_CHECKS = (
    (f"{TARGET}:initialize_megatron", "_compile_dependencies()"),
    (f"{TARGET}:_compile_dependencies", "compile_helpers()"),
)


def prebuilt_helpers_usable() -> bool:
    """True for a wheel install: no Makefile to run, and the shipped extension imports."""
    import megatron.core.datasets as datasets

    if os.path.exists(os.path.join(os.path.dirname(datasets.__file__), "Makefile")):
        return False
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _compile_dependencies(original):
    @functools.wraps(original)
    def wrapper():
        import torch

        if not prebuilt_helpers_usable():
            return original()
        if torch.distributed.get_rank() == 0:
            print("> dataset index helpers: using the prebuilt megatron.core.datasets.helpers_cpp "
                  "(the megatron-core wheel has no Makefile to rebuild them)", flush=True)
        torch.distributed.barrier()

    return wrapper


PATCH = FunctionWrapPatch(
    "msa_megatron.patches.mcore_019_training_helpers", TARGET, {"_compile_dependencies": _compile_dependencies},
    PINNED, SOURCE_CHECKS,
)
apply, remove, is_applied, verify_upstream, upstream = (
    PATCH.apply, PATCH.remove, PATCH.is_applied, PATCH.verify_upstream, PATCH.upstream)

__all__ = ["PATCH", "PINNED", "SOURCE_CHECKS", "TARGET", "apply", "is_applied", "prebuilt_helpers_usable", "remove",
           "upstream", "verify_upstream"]
