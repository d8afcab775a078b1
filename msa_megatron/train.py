"""``msa-train`` / ``python -m msa_megatron.train``: the hydra entry point of the trainer.

    torchrun --nproc-per-node 2 -m msa_megatron.train model=tiny attention=msa train.steps=200 run_dir=runs/x

Composes the packaged configs (``msa_megatron/configs``, shipped in the wheel; the repository's
top-level ``configs`` is a link to it; $MSA_CONFIG_DIR overrides), checks it into the
typed schema (one clear error per bad value, before anything heavy is imported), prints
the command-line overrides on rank 0 (the resolved config goes to <run_dir>/config.yaml;
logging.print_config=true prints it) and hands over to :mod:`msa_megatron.training.loop`.
Errors are one line per node (see _fail); ``msa-train -m`` runs every job of a sweep.
Hydra neither changes directory nor writes files of its own.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

#: The configs shipped inside the package (found wherever it is installed), unless $MSA_CONFIG_DIR says otherwise.
CONFIG_DIR = os.environ.get("MSA_CONFIG_DIR") or str(Path(__file__).resolve().parent / "configs")

EXIT_CONFIG_ERROR = 2


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _claim_error_line() -> bool:
    """Whether this process prints the error line: under torchrun the first rank of each
    node to get here (not always local rank 0: torchrun kills the other workers as soon as
    one exits, so a fixed printer may die before it writes); alone, always."""
    if "LOCAL_RANK" not in os.environ or os.environ.get("LOCAL_WORLD_SIZE", "1") == "1":
        return True
    import tempfile

    # one claim file per launch and node: the workers' parent is the torchrun agent
    name = f"msa-train-error-{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    path = os.path.join(tempfile.gettempdir(), name)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        try:  # a leftover of an earlier launch whose agent had the same pid
            return time.time() - os.path.getmtime(path) > 120
        except OSError:
            return False
    except OSError:
        return os.environ.get("LOCAL_RANK") == "0"


def _fail(message: str, code: int) -> None:
    """One line on stderr per node, then exit ``code``. Under torchrun the line also goes to
    the worker's error file, so torchrun's failure summary names it as the root cause."""
    line = f"msa-train: error: {message}"
    if _claim_error_line():
        print(line, file=sys.stderr, flush=True)
    else:
        time.sleep(0.5)  # the claiming rank is writing its line: do not get it killed first
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json

        # atomically: torchrun may kill this rank mid-write once another rank has exited, and
        # then read a truncated file as the root cause (CI saw its JSONDecodeError under load)
        tmp = f"{error_file}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
            os.replace(tmp, error_file)
        except OSError:
            pass
    raise _Exit(code)


class _Exit(Exception):
    """Leaves one job with an exit code (sys.exit in single runs; recorded in multirun)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


#: Exit codes of the jobs of a hydra multirun (``msa-train -m ...``).
_job_codes: list = []


def _job_context():
    """(multirun?, job number) of the current hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN, int(hc.job.num or 0)
    except Exception:  # noqa: BLE001 - not under hydra (tests call _task directly)
        return False, 0


def _task(cfg) -> None:
    multirun, job = _job_context()
    try:
        code = _run_job(cfg, multirun, job)
    except _Exit as e:
        code = e.code
    if not multirun:
        sys.exit(code)
    _job_codes.append(code)
    if _rank0():
        print(f"msa-train: multirun job {job} exit code {code}", file=sys.stderr, flush=True)


def _overrides() -> list:
    """The command-line overrides of this job (what differs from the defaults)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not under hydra
        return []


def _run_job(cfg, multirun: bool, job: int) -> int:
    from omegaconf import OmegaConf

    from .training.config import ConfigError, load_config, validate
    from .training.logging import quiet_known_warnings

    quiet_known_warnings()

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    suffix = ""
    if multirun:  # every job its own run directory
        if resolved.get("run_dir"):
            resolved["run_dir"] = os.path.join(resolved["run_dir"], str(job))
        else:
            suffix = f"-job{job}"
    try:
        config = load_config(resolved)
        validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG_ERROR)
    yaml_text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    if _rank0():  # the whole configuration goes to <run_dir>/config.yaml; the console shows the overrides
        if config.logging.print_config:
            print("resolved configuration:\n" + yaml_text, flush=True)
        else:
            print("msa-train " + (" ".join(_overrides()) or "(all defaults)"), flush=True)

    from .training.loop import run
    from .training.numerics import NonFiniteError

    try:
        return run(config, yaml_text, run_suffix=suffix)
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG_ERROR)
    except NonFiniteError as e:
        _fail(str(e), 1)
    return 1


def main() -> None:
    """Console script ``msa-train``."""
    if not os.path.isdir(CONFIG_DIR):
        _fail(f"config directory {CONFIG_DIR} not found (it ships inside the msa_megatron package; or set MSA_CONFIG_DIR)", EXIT_CONFIG_ERROR)
    import hydra

    hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(_task)()
    if _job_codes:  # multirun: every job ran; fail if any failed
        failed = [i for i, c in enumerate(_job_codes) if c != 0]
        if failed and _rank0():
            print(f"msa-train: error: {len(failed)} of {len(_job_codes)} multirun jobs failed (jobs {failed})",
                  file=sys.stderr, flush=True)
        sys.exit(_job_codes[failed[0]] if failed else 0)


if __name__ == "__main__":
    main()
