import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from declip.errors import InputError
from declip.train import checkpoint as ckpt

KILLED_WRITER = """
import os, signal, sys, torch
from declip.train import checkpoint as ckpt
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die between the written tmp file and the rename
ckpt.save_torch({"step": 2, "w": torch.full((1000,), 2.0)}, sys.argv[1])
"""


def test_write_killed_before_rename_keeps_the_previous_checkpoint(tmp_path):
    latest = ckpt.checkpoint_dir(tmp_path) / ckpt.LATEST
    ckpt.save_torch({"step": 1, "w": torch.ones(1000)}, latest)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(latest)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    tmp = latest.with_name(".latest.pt.tmp")
    assert tmp.is_file() and tmp.stat().st_size > 0  # the new state was fully written, never renamed
    assert ckpt.find_resume(tmp_path) == latest
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert ckpt.clean_tmp_files(tmp_path) == [tmp] and not tmp.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    ckpt.save_torch({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(InputError, match="bad.pt: not a readable checkpoint"):
        ckpt.load_checkpoint(path)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_only_refuses_pickled_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil(marker)}, path)
    with pytest.raises(InputError, match="evil.pt: refused to load"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = ckpt.rng_state("cpu")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(()).item())
    ckpt.save_torch({"rng": [state]}, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"][0], "cpu")
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(()).item()) == expected


def test_kept_snapshot_survives_the_next_latest(tmp_path):
    latest = ckpt.checkpoint_dir(tmp_path) / ckpt.LATEST
    ckpt.save_torch({"step": 4}, latest)
    kept = ckpt.keep_snapshot(tmp_path, 4)
    ckpt.save_torch({"step": 8}, latest)
    assert kept.name == "step_0000004.pt" and ckpt.load_checkpoint(kept)["step"] == 4
    assert ckpt.load_checkpoint(latest)["step"] == 8
    latest.unlink()
    assert ckpt.find_resume(tmp_path) == kept  # falls back to the newest kept snapshot


def test_export_weights(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3).T, "b": torch.ones(2)}  # a non-contiguous view
    ckpt.export_weights(sd, {"model": {"embed_dim": 8}, "loss": {"mlm_weight": 0.0}}, tmp_path)
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a"], sd["a"]) and torch.equal(loaded["b"], sd["b"])
    assert yaml.safe_load((tmp_path / "model_config.yaml").read_text())["model"]["embed_dim"] == 8
    assert not list(tmp_path.glob(".*tmp"))
