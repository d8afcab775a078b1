"""CheckpointManager._load_model (the full-resume path): a Transformer Engine module's
``_extra_state`` (FP8 metadata, no weights) absent from the loaded state is allowed, as in
weights-only loads; any other missing or unexpected key is still an error, with its name."""

import pytest
import torch

from msa_megatron.training.checkpoint import CheckpointManager


class _TEStandIn(torch.nn.Linear):
    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


def _model():
    return torch.nn.Sequential(_TEStandIn(4, 4), torch.nn.Linear(4, 4))


def test_full_load_allows_missing_te_extra_state(caplog):
    src, dst = _model(), _model()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    assert len(state) < len(src.state_dict())
    with caplog.at_level("WARNING"):
        CheckpointManager._load_model({"model": state}, [dst])  # was: torch strict load, RuntimeError
    assert torch.equal(dst[0].weight, src[0].weight)
    assert "1 Transformer Engine _extra_state entries" in caplog.text and "0._extra_state" in caplog.text


def test_full_load_still_rejects_missing_weights_and_unexpected_keys():
    src = _model()
    state = dict(src.state_dict())
    del state["1.weight"]
    with pytest.raises(RuntimeError, match=r"missing \['1.weight'\]"):
        CheckpointManager._load_model({"model": state}, [_model()])
    state = dict(src.state_dict(), extra=torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"unexpected \['extra'\]"):
        CheckpointManager._load_model({"model": state}, [_model()])


def test_resume_failure_text_keeps_the_key_names():
    """A failed resume is reported on one line (every rank gathers it): torch's state-dict error
    names the keys on the lines after its first, which the report used to drop."""
    from msa_megatron.training.loop import one_line_error

    dst = _model()
    with pytest.raises(RuntimeError) as info:
        dst.load_state_dict({k: v for k, v in dst.state_dict().items() if k != "1.bias"})
    text = one_line_error(info.value)
    assert "\n" not in text and text.startswith("RuntimeError: Error(s) in loading state_dict")
    assert '"1.bias"' in text
    long = one_line_error(ValueError("x" * 5000), limit=100)
    assert len(long) < 200 and long.endswith("(4900 more characters)")
