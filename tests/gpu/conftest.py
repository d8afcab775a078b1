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


def _run_header() -> str:
    """Device, versions, commit and date of the run (for docs/gpu_logs/)."""
    import datetime
    import subprocess

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    commit = os.environ.get("MSA_COMMIT", "")  # the device's copy of the tree may carry another HEAD
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    dev = torch.cuda.get_device_name() if HAS_CUDA else "no CUDA (CPU interpreter subset)"
    return (f"msa gpu tests: device {dev} | torch {torch.__version__} | triton {tv} | commit {commit} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | interpreter {INTERPRETING}")


def pytest_report_header(config):
    return _run_header()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_run_header())  # also under -q, at the end of the log


@pytest.fixture(scope="session", autouse=True)
def _junit_run_properties(record_testsuite_property):
    record_testsuite_property("run", _run_header())
