"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is decorated (when the
kernel modules are imported), so it is set here, at collection time of tests/ops."""

import os

os.environ["TRITON_INTERPRET"] = "1"
