"""The decode kernel tests run the Triton kernels on CPU tensors through Triton's
interpreter: TRITON_INTERPRET must be set before any @triton.jit function is decorated."""

import os

os.environ["TRITON_INTERPRET"] = "1"
