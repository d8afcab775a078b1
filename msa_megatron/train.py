"""``msa-train`` / ``python -m msa_megatron.train``: the hydra entry point of the trainer.

    torchrun --nproc-per-node 2 -m msa_megatron.train model=tiny attention=msa train.steps=200 run_dir=runs/x

Composes the packaged configs (``msa_megatron/configs``, shipped in the wheel; the repository's
top-level ``configs`` is a link to it; $MSA_CONFIG_DIR overrides), checks it into the
typed schema (one clear error per bad value, before anything heavy is imported), prints
the resolved config on rank 0 and hands over to :mod:`msa_megatron.training.loop`.
Hydra neither changes directory nor writes files of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The configs shipped inside the package (found wherever it is installed), unless $MSA_CONFIG_DIR says otherwise.
CONFIG_DIR = os.environ.get("MSA_CONFIG_DIR") or str(Path(__file__).resolve().parent / "configs")

EXIT_CONFIG_ERROR = 2


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _fail(message: str, code: int) -> None:
    if _rank0():
        print(f"msa-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _task(cfg) -> None:
    from omegaconf import OmegaConf

    from .training.config import ConfigError, load_config, validate
    from .training.logging import quiet_known_warnings

    quiet_known_warnings()

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    try:
        config = load_config(resolved)
        validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG_ERROR)
    yaml_text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    if _rank0():
        print("resolved configuration:\n" + yaml_text, flush=True)

    from .training.loop import run
    from .training.numerics import NonFiniteError

    try:
        code = run(config, yaml_text)
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG_ERROR)
    except NonFiniteError as e:
        _fail(str(e), 1)
    sys.exit(code)


def main() -> None:
    """Console script ``msa-train``."""
    if not os.path.isdir(CONFIG_DIR):
        _fail(f"config directory {CONFIG_DIR} not found (it ships inside the msa_megatron package; or set MSA_CONFIG_DIR)", EXIT_CONFIG_ERROR)
    import hydra

    hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
