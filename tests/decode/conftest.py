"""tests/decode on CPU runs the Triton decode kernels through Triton's interpreter
(TRITON_INTERPRET must be set before any @triton.jit function is decorated, so it is set
here, at collection). With CUDA the kernel tests run compiled on the GPU instead (the
convention of tests/gpu: run this directory in its own pytest process there), and the
Megatron / CLI tests stay on the CPU (their child processes get no CUDA device).
Tests marked ``gpu`` are skipped without CUDA or when the interpreter is on."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Where the kernel tests put their tensors.
DEVICE = "cpu" if INTERPRETING or not HAS_CUDA else "cuda"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    if DEVICE == "cuda":
        return
    skip = pytest.mark.skip(reason="needs CUDA with the compiled kernels (TRITON_INTERPRET unset)")
    for item in items:
        if str(item.fspath).startswith(here) and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
