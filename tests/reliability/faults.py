"""Helpers of the fault-injection suite: the tiny-model overrides and the process helpers of
tests/test_train.py (torchrun puts its workers in sessions of their own, so a kill walks /proc), CLI and
torchrun command lines, a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ports import free_port  # noqa: E402
from test_train import TINY, cli_sets, kill_tree, overrides  # noqa: E402

from declip.train.loop import INJECT_ENV  # noqa: E402

__all__ = ["TINY", "cli_sets", "free_port", "kill_tree", "overrides"]

BIN = Path(sys.executable).parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI child: one thread, no stray tracking URI or fault hook."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "", **extra}
    if INJECT_ENV not in extra:
        env.pop(INJECT_ENV, None)
    return env


def declip_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "declip", *args]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """`torchrun -m declip train --config TINY --device cpu ARGS` on `nproc` CPU processes (gloo)."""
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master-port", str(free_port()),
            "-m", "declip", "train", "--config", str(TINY), "--device", "cpu", *args]  # fmt: skip


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc; every thread's children: Snakemake starts jobs from threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [g for c in found for g in children(c)]
