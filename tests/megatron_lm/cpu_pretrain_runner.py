"""Run scripts/pretrain_gpt_msa.py (Megatron-LM's real ``pretrain``) on CPU, for tests only.

``megatron.training`` asserts CUDA during initialisation and touches a few CUDA-only APIs; this
runner installs the backend's CPU compatibility layer (msa_megatron.megatron.compat: CUDA
allocations, RNG and streams on CPU) and then pretends one CUDA device exists for the handful of
places that only *ask* (is_available / device_count / set_device, pinned memory, the optimizer's
graph-capture probe, the device generation asked at TP > 1, torch.compile's device probe). Everything still runs on CPU with gloo
(``--distributed-backend gloo --use-cpu-initialization --num-workers 0``).

TensorBoard is not installed in the CPU environment: with ``$MSA_TB_RECORD`` set, a recording
SummaryWriter stands in for ``torch.utils.tensorboard`` and appends every ``add_scalar`` to that
file (JSON lines); unset, the real one is used (needs the tensorboard package). Real event files
are also checked by scripts/gpu_run_megatron_lm.sh.

Usage (like torchrun's children: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set):
    python tests/megatron_lm/cpu_pretrain_runner.py <pretrain_gpt_msa.py arguments>
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class RecordingSummaryWriter:
    def __init__(self, log_dir=None, **kwargs):
        self.path = os.environ["MSA_TB_RECORD"]

    def add_scalar(self, tag, value, step=None, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": tag, "value": float(value), "step": step}) + "\n")

    def __getattr__(self, name):  # add_text, flush, close, ...: nothing to record
        return lambda *args, **kwargs: None


def pretend_one_cuda_device() -> None:
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # torch.compile would probe the (absent) device
    import torch

    from msa_megatron.megatron.compat import install_cpu_compat

    install_cpu_compat()
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(major=9, minor=0, name="cpu")
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.accelerator.current_stream = lambda *args, **kwargs: types.SimpleNamespace(is_capturing=lambda: False)
    if os.environ.get("MSA_TB_RECORD"):
        tensorboard = types.ModuleType("torch.utils.tensorboard")
        tensorboard.SummaryWriter = RecordingSummaryWriter
        sys.modules["torch.utils.tensorboard"] = tensorboard


def main() -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    pretend_one_cuda_device()
    script = ROOT / "scripts" / "pretrain_gpt_msa.py"
    sys.argv = [str(script), *sys.argv[1:]]
    # Imported as a module, not run as __main__: processes that checkpointing spawns re-import
    # __main__, which stays this light file.
    spec = importlib.util.spec_from_file_location("pretrain_gpt_msa", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()


if __name__ == "__main__":
    main()
