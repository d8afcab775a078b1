"""GPU tests: every test marked ``gpu`` runs on CUDA against the pure-PyTorch reference
(``python -m pytest -m gpu tests/gpu``). The same parametrisation has a small unmarked CPU
subset that runs the kernels through Triton's interpreter (``TRITON_INTERPRET=1``, set here
before any kernel module is imported) so the CPU suite exercises the test code too.

One process runs either the compiled kernels (CUDA present, interpreter off) or the
interpreter (no CUDA): gpu tests are skipped without CUDA or when the interpreter was switched
on in this process (e.g. tests/ops ran first); the CPU subset is skipped when CUDA is present."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    if not HAS_CUDA:
        gpu_skip = pytest.mark.skip(reason="no CUDA device: run `python -m pytest -m gpu tests/gpu` on a GPU machine")
    elif INTERPRETING:
        gpu_skip = pytest.mark.skip(reason="TRITON_INTERPRET=1 in this process (tests/ops sets it): run tests/gpu "
                                           "in its own pytest process")
    else:
        gpu_skip = None
    cpu_skip = pytest.mark.skip(reason="CUDA present: the CPU-interpreter subset of tests/gpu runs only without CUDA")
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if item.get_closest_marker("gpu") is not None:
            if gpu_skip is not None:
                item.add_marker(gpu_skip)
        elif HAS_CUDA:
            item.add_marker(cpu_skip)


@pytest.fixture(autouse=True)
def _gpu_precision():
    """IEEE fp32 matmuls in the reference (no TF32), as the fp32 tolerances assume."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
