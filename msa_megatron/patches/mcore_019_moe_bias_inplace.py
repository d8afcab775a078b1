"""Fix local-spec MoE experts with biases at TP=1 / EP=1 (megatron-core 0.19.x).

Upstream bug: ``MLP.forward`` (megatron/core/transformer/mlp.py) adds the expert bias in
place, ``output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)``. With
``tensor_model_parallel_size == expert_model_parallel_size == 1`` the local
``RowParallelLinear`` returns the input of ``_ReduceFromModelParallelRegion`` as-is, i.e. a
view created inside a custom autograd Function, and autograd forbids modifying it in place:
``RuntimeError: Output 0 of _ReduceFromModelParallelRegion is a view and is being modified
inplace``. It hits every local-spec MoE model with ``add_bias_linear=True`` (the default)
and no expert parallelism, on CPU and GPU alike.

Fix: that one statement becomes the out-of-place ``output = output + ...`` (same value,
same gradient). The patch recompiles ``MLP.forward`` from its upstream source with exactly
that line replaced (line numbers preserved for tracebacks), after checking the source hash,
so any upstream change fails loudly.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap

from msa_megatron.patches import check_pinned

log = logging.getLogger("msa_megatron.patches")

#: sha256 of upstream ``MLP.forward`` in megatron-core 0.19.2.
PINNED_SHA256 = "bce28c9dcc3a255552fadc5701ce6d45942e2ef2233f79d95f39241f3e49691d"
BUGGY = "output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"
FIXED = "output = output + output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)"

_ORIGINAL = {}


def _mlp_class():
    from megatron.core.transformer.mlp import MLP

    return MLP


def upstream_forward():
    return _ORIGINAL.get("forward", _mlp_class().forward)


def verify_upstream() -> None:
    from msa_megatron.megatron.compat import check_mcore_version

    check_mcore_version("msa_megatron.patches.mcore_019_moe_bias_inplace")
    forward = upstream_forward()
    check_pinned(forward, PINNED_SHA256, "msa_megatron.patches.mcore_019_moe_bias_inplace")
    if inspect.getsource(forward).count(BUGGY) != 1:
        raise RuntimeError(f"upstream MLP.forward must contain {BUGGY!r} exactly once")


def is_applied() -> bool:
    return getattr(_mlp_class().forward, "__msa_patch__", False)


def _fixed_forward(original):
    source = textwrap.dedent(inspect.getsource(original)).replace(BUGGY, FIXED)
    filename = inspect.getsourcefile(original)
    first_line = inspect.getsourcelines(original)[1]
    tree = ast.parse(source, filename=filename)
    ast.increment_lineno(tree, first_line - 1)
    namespace: dict = {}
    exec(compile(tree, filename, "exec"), original.__globals__, namespace)
    fixed = namespace[original.__name__]
    fixed.__qualname__ = original.__qualname__
    fixed.__doc__ = original.__doc__
    fixed.__msa_patch__ = True
    fixed.__wrapped_upstream__ = original
    return fixed


def apply() -> bool:
    """Install the fixed MLP.forward; True if this call installed it."""
    if is_applied():
        return False
    verify_upstream()
    mlp = _mlp_class()
    _ORIGINAL["forward"] = mlp.forward
    mlp.forward = _fixed_forward(mlp.forward)
    log.info("MSA: patched megatron.core.transformer.mlp.MLP.forward (out-of-place expert bias add)")
    return True


def remove() -> None:
    """Restore the upstream MLP.forward (tests)."""
    if "forward" in _ORIGINAL:
        _mlp_class().forward = _ORIGINAL.pop("forward")


__all__ = ["BUGGY", "FIXED", "PINNED_SHA256", "apply", "is_applied", "remove", "verify_upstream"]
