"""Kill anywhere: a 2-process CPU training (torchrun, gloo) is killed at 5 seeded steps in turn and
resumed each time; its final state is bitwise the state of an uninterrupted run.

The five kills, at steps drawn from a seeded RNG (10 steps, a checkpoint every step):
- SIGKILL of the whole process tree as soon as the step is logged (lands anywhere in the step, its
  checkpoint write included), three times;
- SIGKILL of rank 1's worker only: the job must fail within a bounded time (no hang on a collective);
- SIGKILL of rank 0 inside the checkpoint write of that step, after the tmp file is complete and before
  the rename: the previous checkpoint stays, the resume uses it and removes the tmp file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faults import BIN, TINY, children, cli_sets, free_port, kill_tree, overrides, start, torchrun_cmd

from declip.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.reliability

STEPS = 10
KILL_STEPS = sorted(random.Random(2026).sample(range(1, STEPS), 5))
MODES = ["tree", "tree", "rank1", "write", "tree"]
DIST_TIMEOUT_S = 20
EXACT = ("loss", "mvs", "nns", "simsiam", "mlm", "i2t_top1", "nn_bank_fill", "lr", "logit_scale", "replaced_samples")

DYING_WRITER = """
import os, signal, sys
from declip.cli import main
from declip.train import checkpoint as ckpt

save, step = ckpt.save_torch, int(os.environ["DIE_IN_WRITE_OF_STEP"])

def dying_save(obj, path):
    if obj["step"] == step:  # the tmp file gets written in full, the rename never happens
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path)

ckpt.save_torch = dying_save
sys.exit(main(sys.argv[1:]))
"""


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(proc: subprocess.Popen, run: Path, seen: int, step: int, timeout: float = 120) -> None:
    """Until a metrics row of `step` (or later) appears past the first `seen` rows."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in rows(run)[seen:]):
        assert proc.poll() is None, f"finished before step {step}:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    for pid in children(proc.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {proc.pid}")


def latest_step(run: Path) -> int:
    """The step of the run's checkpoint; 0 when killed before its first one (the resume starts afresh)."""
    path = run / "checkpoints" / "latest.pt"
    return int(load_checkpoint(path)["step"]) if path.exists() else 0


def assert_same(a, b, where: str) -> None:
    """Bitwise equality of nested checkpoint values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_five_kills_anywhere_then_bitwise_equal_to_an_uninterrupted_run(demo, tmp_path, reaper):
    sets = cli_sets(overrides(demo, f"train.max_steps={STEPS}", "checkpoint.every_steps=1",
                              f"train.dist_timeout_s={DIST_TIMEOUT_S}"))  # fmt: skip
    ref, run = tmp_path / "reference", tmp_path / "killed"
    finish(start(torchrun_cmd(2, "--out", str(ref), *sets), tmp_path))
    writer = tmp_path / "dying_writer.py"
    writer.write_text(DYING_WRITER)

    resumed_at = []
    for k, mode in zip(KILL_STEPS, MODES, strict=True):
        seen = len(rows(run))
        if mode == "write":
            k = max(k, latest_step(run) + 1)  # a step this launch will checkpoint
            cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master-port", str(free_port()), str(writer),
                   "train", "--config", str(TINY), "--device", "cpu", "--out", str(run), *sets]  # fmt: skip
            proc = start(cmd, tmp_path, DIE_IN_WRITE_OF_STEP=str(k))
            reaper.append(proc)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode != 0, out[-3000:]
            assert (run / "checkpoints" / ".latest.pt.tmp").stat().st_size > 0  # written, never renamed
            assert latest_step(run) == k - 1, out[-3000:]  # the previous checkpoint, still loadable
        else:
            proc = start(torchrun_cmd(2, "--out", str(run), *sets), tmp_path)
            reaper.append(proc)
            wait_for_step(proc, run, seen, k)
            if mode == "tree":
                kill_tree(proc.pid)
                proc.communicate(timeout=60)
            else:
                os.kill(rank_pid(proc, 1), signal.SIGKILL)
                t0 = time.monotonic()
                out, _ = proc.communicate(timeout=DIST_TIMEOUT_S + 60)
                failed_after = time.monotonic() - t0
                assert proc.returncode != 0 and failed_after < DIST_TIMEOUT_S + 30, (failed_after, out[-3000:])
        resumed_at.append(latest_step(run))

    log = finish(start(torchrun_cmd(2, "--out", str(run), *sets), tmp_path))
    assert f"resumed from {run / 'checkpoints' / 'latest.pt'} at step {resumed_at[-1]}" in log
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the write-kill's tmp file was removed
    text = (run / "train.log").read_text()
    for step in filter(None, resumed_at[:-1]):
        assert f"at step {step} (" in text  # every launch resumed from the last checkpoint, never from 0

    a, b = (load_checkpoint(r / "checkpoints" / "latest.pt") for r in (ref, run))
    assert a["step"] == b["step"] == STEPS and a["samples_seen"] == b["samples_seen"] == STEPS * 2 * 4
    for key in ("model", "optimizer", "objective", "scaler", "lr_scale"):
        assert_same(a[key], b[key], key)
    # The global RNG states ("rng") are not compared: training draws all its randomness from generators seeded
    # by (seed, draw), never from them (the bitwise-equal weights show it), while Python's and NumPy's start
    # OS-seeded in every process and each DataLoader iterator takes one draw from torch's.
    for key in ("replaced", "skipped", "lr_scale"):
        assert a["train_state"][key] == b["train_state"][key], key
    assert not torch.equal(a["objective"][0]["nn_bank"], a["objective"][1]["nn_bank"])  # two real banks

    # Steps run again after a kill logged again: every replay has the reference's values, to the bit.
    expected = {r["step"]: r for r in rows(ref)}
    replayed = rows(run)
    assert {r["step"] for r in replayed} == set(range(1, STEPS + 1)) and len(replayed) > STEPS
    for r in replayed:
        assert {k: r[k] for k in EXACT} == {k: expected[r["step"]][k] for k in EXACT}, r["step"]
