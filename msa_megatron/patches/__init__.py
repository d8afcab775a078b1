"""Version-pinned changes to megatron-core, each with ``apply()`` and its own test.

* :mod:`msa_megatron.patches.mcore_019_msa_registration`: registers ``experimental_attention_variant='msa'``
  in Megatron-Core's experimental-attention spec builders (and lets them use the local backend).
* :mod:`msa_megatron.patches.mcore_019_moe_bias_inplace`: fixes an in-place add on a view in
  ``MLP.forward`` that breaks local-spec MoE experts with biases at TP=1 / EP=1.
* :mod:`msa_megatron.patches.mcore_019_index_grad_norm_group`: registers the ``msa_index``
  grad-norm group, so the index branch's (KL) gradients are clipped by their own norm and never
  scale the backbone's update (``msa.index_grad_clip=separate``).

Each patch refuses another megatron-core version and checks the source of what it patches,
so an upstream change fails loudly instead of being patched blindly.
"""

from __future__ import annotations

import hashlib
import inspect


def source_sha256(obj) -> str:
    """SHA-256 of an object's source text (what the pins in each patch refer to)."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


def check_pinned(obj, expected_sha256: str, what: str) -> None:
    actual = source_sha256(obj)
    if actual != expected_sha256:
        raise RuntimeError(
            f"{what}: the upstream source of {obj.__module__}.{obj.__qualname__} changed "
            f"(sha256 {actual[:16]}..., pinned {expected_sha256[:16]}...). Re-check the patch against it "
            "and update the pin."
        )
