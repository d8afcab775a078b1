"""Checkpoint integrity (issue 18, items 1-2): every checkpoint carries a manifest of file
sizes and sha256; nothing of a checkpoint is unpickled before it matches; a damaged newest
checkpoint is named in one line and the run resumes from the newest older complete one."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from msa_megatron.training.checkpoint import (MANIFEST, CheckpointError, CheckpointManager, verify_checkpoint,
                                              write_manifest)

from .conftest import QUIET
from .test_config import cfg_of


class _RunsCode:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _fake_checkpoint(path: Path, shard: bytes = b"\x01" * 4096) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (path / ".metadata").write_bytes(pickle.dumps({"plain": 1}))
    (path / "__0_0.distcp").write_bytes(shard)
    write_manifest(path)
    return path


def test_manifest_detects_every_kind_of_damage(tmp_path):
    ck = _fake_checkpoint(tmp_path / "step_00000002", shard=bytes(range(256)) * 64)
    assert verify_checkpoint(ck) is None
    shard = ck / "__0_0.distcp"
    good = shard.read_bytes()
    with open(shard, "r+b") as f:  # 4 KB of garbage inside the shard, same size
        f.seek(4096 - 1024)
        f.write(os.urandom(1024))
    assert verify_checkpoint(ck) == "__0_0.distcp does not match its sha256 in the manifest (damaged)"
    shard.write_bytes(good[:1000])
    assert verify_checkpoint(ck) == "__0_0.distcp is 1000 bytes, the manifest says 16384 (truncated or overwritten)"
    shard.unlink()
    assert verify_checkpoint(ck) == "__0_0.distcp is missing"
    shard.write_bytes(good)
    (ck / "extra.pt").write_bytes(b"x")
    assert verify_checkpoint(ck) == "extra.pt is not in the manifest"
    (ck / "extra.pt").unlink()
    assert verify_checkpoint(ck) is None
    (ck / MANIFEST).write_text("{torn")
    assert verify_checkpoint(ck).startswith("manifest.json unreadable (JSONDecodeError")
    (ck / MANIFEST).unlink()
    assert verify_checkpoint(ck).startswith("no manifest.json (not saved by this version of msa-train)")


def test_crafted_metadata_is_detected_without_unpickling(tmp_path):
    """The threat is real: torch's reader unpickles .metadata (runs code); the manifest check
    catches the swap without loading it."""
    from torch.distributed.checkpoint import FileSystemReader

    ck = _fake_checkpoint(tmp_path / "step_00000002")
    sentinel = tmp_path / "pwned"
    (ck / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(sentinel))))
    assert verify_checkpoint(ck).startswith(".metadata ")  # size or sha256
    assert not sentinel.exists()
    try:
        FileSystemReader(str(ck)).read_metadata()
    except Exception:  # noqa: BLE001 - what it returns is not Metadata; the code already ran
        pass
    assert sentinel.exists()


def test_latest_naming_a_missing_step_and_damage_fall_back_to_the_older_checkpoint(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    _fake_checkpoint(ck / "step_00000002")
    _fake_checkpoint(ck / "step_00000004")
    (ck / "latest").write_text("step_00000006\n")  # the step directory is gone
    mgr = CheckpointManager(cfg_of(f"run_dir={run}"))
    assert mgr.resume_source() == ("resume", ck / "step_00000004")
    mgr.commit(ck / "step_00000004")  # it loaded: `latest` re-pointed at what was used
    assert (ck / "latest").read_text().strip() == "step_00000004"

    (ck / "step_00000004" / "__0_0.distcp").write_bytes(b"\x02" * 4096)  # same size, other bytes
    assert mgr.resume_source() == ("resume", ck / "step_00000002")
    assert (ck / "step_00000004").is_dir()  # nothing moves before the older one has loaded
    mgr.commit(ck / "step_00000002")
    assert (ck / "damaged-step_00000004").is_dir() and not (ck / "step_00000004").exists()
    assert (ck / "latest").read_text().strip() == "step_00000002"

    (ck / "step_00000002" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint \(each one failed, see above\); nothing was changed"):
        CheckpointManager(cfg_of(f"run_dir={run}")).resume_source()
    assert (ck / "step_00000002").is_dir()


def test_fallback_can_be_refused_and_load_paths_are_checked(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    _fake_checkpoint(ck / "step_00000002")
    _fake_checkpoint(ck / "step_00000004")
    (ck / "latest").write_text("step_00000004\n")
    (ck / "step_00000004" / "__0_0.distcp").write_bytes(b"\x00" * 10)
    mgr = CheckpointManager(cfg_of(f"run_dir={run}", "checkpoint.fallback=false"))
    with pytest.raises(CheckpointError, match=r"^checkpoint \(resume\)=.*step_00000004: __0_0.distcp is 10 bytes, .*"
                                              r"checkpoint.fallback=false"):
        mgr.resume_source()
    assert (ck / "step_00000004").is_dir()  # refused: nothing moved

    other = CheckpointManager(cfg_of(f"run_dir={tmp_path / 'new'}", f"checkpoint.init_from={ck / 'step_00000004'}"))
    with pytest.raises(CheckpointError, match=r"^checkpoint\.init_from=.*step_00000004: step_00000004: __0_0.distcp is 10"):
        other.resume_source()
    other = CheckpointManager(cfg_of(f"run_dir={tmp_path / 'new2'}", f"checkpoint.load={ck / 'step_00000002'}"))
    assert other.resume_source() == ("load", ck / "step_00000002")


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_named_and_the_older_one_resumes_bit_exact(server, tmp_path):
    run = tmp_path / "run"
    common = QUIET + ["attention.warmup.steps=2", "checkpoint.interval=2", "checkpoint.keep_last=3"]
    ref = server.run(tmp_path / "ref", common + ["train.steps=4"], world=1)
    assert ref.ok(), ref.logs[-4000:]
    first = server.run(run, common + ["train.steps=4"], world=1)
    assert first.ok(), first.logs[-4000:]
    ck = run / "checkpoints"
    assert (ck / "step_00000004" / MANIFEST).is_file()

    shard = next((ck / "step_00000004").glob("*.distcp"))
    with open(shard, "r+b") as f:  # issue 18.1: 4 KB of garbage inside a shard loaded silently
        f.seek(shard.stat().st_size // 2)
        f.write(os.urandom(4096))
    again = server.run(run, common + ["train.steps=4"], world=1)
    assert again.ok(), again.logs[-4000:]
    line = [ln for ln in again.logs.splitlines() if "step_00000004" in ln and "trying the newest older complete checkpoint" in ln]
    assert len(line) == 1 and "does not match its sha256" in line[0], again.logs[-4000:]
    steps = again.steps()
    assert sorted(steps) == [1, 2, 3, 4]
    for s in (3, 4):  # resumed from step 2: the same steps as an undisturbed run
        assert steps[s]["lm_loss"] == ref.steps()[s]["lm_loss"]

    sentinel = tmp_path / "pwned"  # issue 18.2: a crafted .metadata ran code on resume
    (ck / "step_00000004" / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(sentinel))))
    third = server.run(run, common + ["train.steps=4"], world=1)
    assert third.ok(), third.logs[-4000:]
    assert not sentinel.exists()
    assert (ck / "damaged-step_00000004").is_dir() and (ck / "latest").read_text().strip() == "step_00000004"
    assert any("step_00000004: .metadata" in ln and "trying the newest older complete checkpoint" in ln for ln in third.logs.splitlines())


def test_msa_convert_load_is_checked_before_reading(tmp_path, capsys):
    from msa_megatron.convert_cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {}\nmsa: {}\nvocab_size: 16\nmax_sequence_length: 8\n")
    args = ["--save", str(tmp_path / "out"), "--config", str(spec), "--load"]
    with pytest.raises(SystemExit) as exc:
        main(args + [str(tmp_path)])
    assert exc.value.code == 2 and "not a distributed checkpoint directory (no metadata.json)" in capsys.readouterr().err
    ck = _fake_checkpoint(tmp_path / "step_00000002")
    (ck / "__0_0.distcp").write_bytes(b"\x03" * 4096)
    with pytest.raises(SystemExit) as exc:
        main(args + [str(ck)])
    assert exc.value.code == 2 and "__0_0.distcp does not match its sha256" in capsys.readouterr().err
