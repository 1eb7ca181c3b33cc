"""Disk full: a checkpoint write that runs out of space fails with one clear line (path, reason, free
space), removes its partial tmp file and leaves the previous checkpoint loadable.

Two ways to fill the disk: a real 60 MiB tmpfs under the checkpoints folder (ENOSPC; needs mount
rights, skipped without them) and RLIMIT_FSIZE in the training process (EFBIG; works anywhere). The tiny
model's checkpoint is ~39 MB: the first fits, the tmp file of the second does not.
"""

from __future__ import annotations

import resource
import shutil
import subprocess

import pytest
from faults import TINY, child_env, cli_sets, declip_cmd, overrides

from declip.config import load_config
from declip.train.checkpoint import load_checkpoint
from declip.train.loop import train

pytestmark = pytest.mark.reliability

FSIZE_LIMIT = 20 << 20


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


@pytest.mark.parametrize("how", ["tmpfs", "rlimit_fsize"])
def test_checkpoint_write_on_a_full_disk(demo, tmp_path, how):
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    if how == "tmpfs":
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(folder)], capture_output=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        common = overrides(demo, "checkpoint.every_steps=1")
        train(load_config(TINY, [*common, "train.max_steps=1"]), run, device="cpu")  # checkpoint of step 1
        assert load_checkpoint(folder / "latest.pt")["step"] == 1
        proc = subprocess.run(
            declip_cmd("train", "--config", str(TINY), *cli_sets([*common, "train.max_steps=2"]), "--out", str(run)),
            env=child_env(), capture_output=True, text=True, timeout=300,
            preexec_fn=limit_file_size if how == "rlimit_fsize" else None,
        )  # fmt: skip
        reason = "No space left on device" if how == "tmpfs" else "File too large"
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"cannot write {folder / 'latest.pt'}: {reason} (" in proc.stderr
        assert f"MiB free in {folder}); the previous latest.pt is intact" in proc.stderr
        assert "resumed from" in proc.stdout  # it did resume, and failed only at the write of step 2
        assert load_checkpoint(folder / "latest.pt")["step"] == 1  # intact and loadable
        assert sorted(p.name for p in folder.iterdir()) == ["latest.pt"]  # the partial tmp file is gone
        if how == "tmpfs":
            assert shutil.disk_usage(folder).free > 15 << 20  # its space was given back
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(folder)], check=False)
