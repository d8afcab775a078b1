"""Clip the MSA index branch's gradients by their own norm (megatron-core 0.19.x).

Why: the KL gradient reaches only the index projections (the paper's stop-gradient), so it
should never change the backbone's update. Megatron clips every parameter by one global norm,
though, and the index branch's KL gradient dominates that norm early in training: our 8K scale
runs logged a global norm of 1.5-2.0 for MSA against 0.6-1.0 for dense between steps 50 and 230,
above ``clip_grad=1.0``, so the global clip scaled the *backbone's* gradient by a factor the KL
set (docs/fidelity.md).

Megatron-Core 0.19 already clips registered grad-norm groups separately (built for MTP heads):
a parameter carrying ``grad_norm_group=<group>`` is left out of the main norm and clipped by its
group's norm at the same ``clip_grad``, and the norm ``optimizer.step()`` returns (the logged
one) is the main norm; the distributed optimizer copies the attribute onto its fp32 shards.
This patch registers one more group, :data:`INDEX_GRAD_NORM_GROUP`, by appending it to
``SEPARATE_GRAD_NORM_GROUPS``, after checking the pinned sources of every function that reads
that tuple or the attribute, so an upstream change fails loudly. :func:`tag` marks parameters.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from msa_megatron.patches import check_pinned

log = logging.getLogger("msa_megatron.patches")

#: The grad-norm group of the index branch's parameters (msa.index_grad_clip=separate).
INDEX_GRAD_NORM_GROUP = "msa_index"

#: sha256 of the upstream functions (megatron/core/optimizer/optimizer.py, megatron-core 0.19.2)
#: that implement separate grad-norm groups.
PINNED_SHA256 = {
    "MegatronOptimizer.clip_grad_norm": "99e5568aa4d623cbe0155999f872033834879ef01c7dfa020adc200bb6236c3d",
    "MegatronOptimizer._compute_grad_norms_by_group":
        "2dcc7f938453dbe5a869340778fc8a72db3160279be09b3ed306c9d9e738f432",
    "MegatronOptimizer.get_grads_for_grad_norm": "d6037c3dabae18b32272c227cb63f2cd3755fcb829a5aedbc6aad3f59d74c957",
    "ChainedOptimizer.step": "c2b301e02ec29f4e123bbfa279b6a89238d58f861de09872fb685de9eafa6e53",
    "ChainedOptimizer._compute_grad_norms_by_group":
        "a9aefc928ea177409ad51a73e069dd890691f1592b6013ac66193fd30cd76d76",
    "copy_optimizer_param_metadata": "b085b9ab084c3cf73d2ad65471e8ec1b69648bf193757b20241f6042c96108b1",
    "_validate_grad_norm_group": "0a612502c1496a62f5a0f67e009b095635361f7b0dfbb68cdcac21d2a6371bc9",
}

_UPSTREAM = {}


def _module():
    from megatron.core.optimizer import optimizer

    return optimizer


def _upstream_object(qualname: str):
    obj = _module()
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def verify_upstream() -> None:
    from msa_megatron.megatron.compat import check_mcore_version

    what = "msa_megatron.patches.mcore_019_index_grad_norm_group"
    check_mcore_version(what)
    mo = _module()
    if getattr(mo, "GRAD_NORM_GROUP_ATTR", None) != "grad_norm_group" or not isinstance(
            getattr(mo, "SEPARATE_GRAD_NORM_GROUPS", None), tuple):
        raise RuntimeError(f"{what}: megatron.core.optimizer.optimizer no longer has GRAD_NORM_GROUP_ATTR = "
                           "'grad_norm_group' and a SEPARATE_GRAD_NORM_GROUPS tuple; re-check the patch")
    for qualname, sha in PINNED_SHA256.items():
        check_pinned(_upstream_object(qualname), sha, what)


def is_applied() -> bool:
    return INDEX_GRAD_NORM_GROUP in _module().SEPARATE_GRAD_NORM_GROUPS


def apply() -> bool:
    """Register the index grad-norm group; True if this call registered it."""
    if is_applied():
        return False
    verify_upstream()
    mo = _module()
    _UPSTREAM.setdefault("groups", mo.SEPARATE_GRAD_NORM_GROUPS)
    mo.SEPARATE_GRAD_NORM_GROUPS = tuple(mo.SEPARATE_GRAD_NORM_GROUPS) + (INDEX_GRAD_NORM_GROUP,)
    log.debug("registered grad-norm group %r in megatron.core.optimizer", INDEX_GRAD_NORM_GROUP)
    return True


def remove() -> None:
    """Restore upstream's groups (tests)."""
    if "groups" in _UPSTREAM:
        _module().SEPARATE_GRAD_NORM_GROUPS = _UPSTREAM.pop("groups")


def tag(params: Iterable[torch.nn.Parameter]) -> int:
    """Mark ``params`` as the index grad-norm group (registering it first); returns how many.
    Tag before the optimizer is built: it copies the attribute onto its shards then."""
    apply()
    n = 0
    for p in params:
        setattr(p, _module().GRAD_NORM_GROUP_ATTR, INDEX_GRAD_NORM_GROUP)
        n += 1
    return n


__all__ = ["INDEX_GRAD_NORM_GROUP", "PINNED_SHA256", "apply", "is_applied", "remove", "tag", "verify_upstream"]
