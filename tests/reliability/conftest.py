"""Fixtures of the fault-injection suite (helpers: faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """48 generated training records (some planted broken) and a 1-image-per-class val set."""
    from declip.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("reliability_data") / "demo"
    make_demo_data(root, seed=0, n_train=48, n_val_per_class=1, progress=False)
    return root


@pytest.fixture
def reaper():
    """A list to append started processes to; any still running at teardown (a failed test) is killed with its tree."""
    from faults import kill_tree

    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate()
