"""materialize_optimizer_state: a per-parameter 'step' only for torch's own optimizers.

Transformer Engine's FusedAdam (megatron's Adam whenever TE is installed) keeps 'step' in its
param groups and raises KeyError on any per-parameter state name it does not know; on the
H100 run of 2026-12-06 every TE resume failed with "KeyError: 'step'" for this reason."""

from types import SimpleNamespace

import torch

from msa_megatron.training.checkpoint import materialize_optimizer_state


class GroupStepAdam(torch.optim.Optimizer):
    """Stands in for TE's FusedAdam: state exp_avg / exp_avg_sq per parameter, 'step' per group.
    Defined here, so its module is not torch.optim."""

    known = ("exp_avg", "exp_avg_sq")

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})

    def state_dict(self):
        sd = super().state_dict()
        for st in sd["state"].values():
            for name in st:
                if name not in self.known:
                    raise KeyError(name)
        return sd


def _init_zeros(opt, config):
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["exp_avg"] = torch.zeros_like(p)
            opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)


def _wrapped(inner):
    return SimpleNamespace(optimizer=inner, init_state_fn=_init_zeros, config=None)


def test_torch_adamw_gets_a_per_parameter_step():
    p = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([p])
    materialize_optimizer_state(_wrapped(inner))
    assert set(inner.state[p]) == {"exp_avg", "exp_avg_sq", "step"}
    assert inner.state[p]["step"].item() == 0


def test_group_step_optimizer_gets_no_per_parameter_step():
    p = torch.nn.Parameter(torch.ones(3))
    inner = GroupStepAdam([p])
    materialize_optimizer_state(_wrapped(inner))
    assert set(inner.state[p]) == {"exp_avg", "exp_avg_sq"}
    inner.state_dict()  # raised KeyError('step') before the fix


def test_existing_state_is_left_alone():
    p = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([p])
    inner.state[p]["exp_avg"] = torch.full((3,), 7.0)
    materialize_optimizer_state(_wrapped(inner))
    assert set(inner.state[p]) == {"exp_avg"} and inner.state[p]["exp_avg"][0].item() == 7.0
