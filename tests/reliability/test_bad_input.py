"""Bad config and CLI input: the real CLI, in subprocesses, fails before any work with exit status 2 and
one line on stderr naming the key or path; no traceback, nothing written.

Batch geometry: `train.batch_size` is per device and the global batch is world size x batch_size, so no
config can ask for a global batch that a world size does not divide. What can be expressed is checked:
a zero/negative per-device batch (refused, the same on every rank) and a training set smaller than one
global batch (not an error: the sample stream runs over as many passes as needed).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from faults import TINY, child_env, declip_cmd, overrides

from declip.train.sampler import IterationSampler

pytestmark = pytest.mark.reliability


def cases(base: Path, demo: Path) -> dict[str, tuple[list[str], str, Path]]:
    """name -> (CLI arguments, text stderr must hold, a path that must not exist afterwards)."""
    run = base / "run"
    good = [a for s in overrides(demo) for a in ("--set", s)]
    unknown = base / "unknown_key.yaml"
    unknown.write_text("train:\n  max_step: 10\n")
    wrong_type = base / "wrong_type.yaml"
    wrong_type.write_text("train:\n  batch_size: [4]\n")
    no_root = base / "no_root"
    no_root.mkdir()
    (no_root / "yfcc15m_clean_open_data.json").write_text('{"caption": "a", "filename": "a.jpg"}\n')
    train = ["train", "--config", str(TINY), *good, "--out", str(run)]
    return {
        "config file missing": (["train", "--config", str(base / "nope.yaml"), "--out", str(run)],
                                f"config file not found: {base / 'nope.yaml'}", run),
        "unknown key in the file": (["train", "--config", str(unknown), "--out", str(run)],
                                    f"{unknown}: unknown config key 'train.max_step'", run),
        "wrong type in the file": (["train", "--config", str(wrong_type), "--out", str(run)],
                                   "config key 'train.batch_size': expected an integer, got [4]", run),
        "unknown key override": ([*train, "--set", "optim.learning_rate=1"], "unknown config key 'optim.learning_rate'",
                                 run),
        "wrong type override": ([*train, "--set", "train.max_steps=ten"], "'train.max_steps': expected an integer",
                                run),
        "zero batch": ([*train, "--set", "train.batch_size=0"], "'train.batch_size' must be > 0, got 0", run),
        "negative steps": ([*train, "--set", "train.max_steps=-3"], "'train.max_steps' must be > 0, got -3", run),
        "zero checkpoint interval": ([*train, "--set", "checkpoint.every_steps=0"],
                                    "'checkpoint.every_steps' must be > 0", run),
        "missing dataset": ([*train, "--set", f"data.dataset_dir={base / 'gone'}"],
                            f"data.train_meta: {base / 'gone' / 'yfcc15m_clean_open_data.json'} does not exist", run),
        "missing image root": ([*train, "--set", f"data.dataset_dir={no_root}"],
                               f"data.train_root: {no_root / 'yfcc15m_clean_open_data'} does not exist", run),
        "missing checkpoint for eval": (["eval", "--config", str(TINY), *good, "--checkpoint", str(base / "no.pt"),
                                         "--out", str(base / "eval.json")],
                                        f"checkpoint not found: {base / 'no.pt'}", base / "eval.json"),
        "missing manifest": (["check-data", "--meta", str(base / "no.jsonl"), "--root", str(demo), "--out",
                              str(base / "check")], f"manifest not found: {base / 'no.jsonl'}", base / "check"),
        "missing root": (["check-data", "--meta", str(demo / "val_official.json"), "--root", str(base / "noroot"),
                          "--out", str(base / "check")],
                         f"image root is not a readable folder: {base / 'noroot'}", base / "check"),
        "push-metrics of a non-run folder": (["push-metrics", str(base / "norun")],
                                             f"{base / 'norun' / 'config.yaml'}: not found", base / "norun"),
        "convert a missing file": (["convert-checkpoint", str(base / "ref.pt"), str(base / "out.safetensors")],
                                   f"reference checkpoint not found: {base / 'ref.pt'}", base / "out.safetensors"),
        "no such device": ([*train, "--device", "cuda"], "--device cuda: no CUDA device is visible", run),
    }  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory, demo):
    """Every case's CLI started at once (they only import and validate), then collected."""
    base = tmp_path_factory.mktemp("bad_input")
    table = cases(base, demo)
    procs = {
        name: subprocess.Popen(declip_cmd(*args), cwd=base, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, (args, _, _) in table.items()
    }  # fmt: skip
    return {name: (*proc.communicate(timeout=300), proc.returncode, *table[name][1:]) for name, proc in procs.items()}


CASES = [
    "config file missing", "unknown key in the file", "wrong type in the file", "unknown key override",
    "wrong type override", "zero batch", "negative steps", "zero checkpoint interval", "missing dataset",
    "missing image root", "missing checkpoint for eval", "missing manifest", "missing root",
    "push-metrics of a non-run folder", "convert a missing file", "no such device",
]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_fails_first_with_one_line_naming_the_key_or_path(results, name):
    if name == "no such device" and torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    out, err, code, expected, untouched = results[name]
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert not untouched.exists()  # failed before any work: no run folder, no output


def test_a_training_set_smaller_than_a_global_batch_is_not_an_error():
    n, batch, world = 3, 4, 2  # 3 records, global batch 8
    per_rank = [list(zip(range(2 * batch), IterationSampler(n, batch, r, world, seed=5), strict=False))
                for r in range(world)]  # fmt: skip
    step0 = [key for r in range(world) for _, key in per_rank[r][:batch]]
    assert sorted(d for _, d in step0) == list(range(8))  # disjoint draws cover the global batch
    counts = torch.bincount(torch.tensor([i for i, _ in step0]), minlength=n)
    assert counts.tolist() in ([3, 3, 2], [3, 2, 3], [2, 3, 3])  # passes 0, 1 and two thirds of 2
