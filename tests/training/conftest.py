"""Shared fixtures of the trainer tests: a session-wide corpus cache and the warm run
launcher (see launcher.py)."""

from __future__ import annotations

import os

import pytest

from .launcher import RunServer


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("msa_cache")
    os.environ["MSA_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def server(cache_dir):
    srv = RunServer(env={"MSA_CACHE_DIR": str(cache_dir)})
    yield srv
    srv.close()


#: Overrides every test run uses: small, quiet, no progress bar, fixed MFU peak.
QUIET = ["logging.progress_bar=false", "logging.log_interval=1", "logging.peak_tflops=0.05", "train.eval_interval=0",
         "logging.wandb.enabled=false"]
