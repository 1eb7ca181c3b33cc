"""Atomic checkpoints, auto-resume and the final safetensors export.

A checkpoint (docs/architecture.md) is one file that `torch.load(weights_only=True)` reads: only
tensors and plain Python values, so loading never runs pickled code. Every rank's NN bank and RNG
states are gathered to rank 0 and stored as lists indexed by rank; resume gives each rank its own.

Atomicity: write `.NAME.tmp` in the same folder, flush and fsync it, `os.replace` it over NAME, fsync
the folder. A process killed at any point leaves either the previous file or the new one, never a
torn one; leftover tmp files are ignored and removed on the next resume.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from declip.errors import InputError

LATEST = "latest.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC/EFBIG/EDQUOT error behind `e` (torch.save wraps it in a RuntimeError), else None."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a tmp file beside `path`, then atomically put it in place.

    A failed write removes its tmp file and leaves `path` as it was; a full disk (or file size limit) is an
    InputError naming the path and the free space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (full := _disk_full(e)) is None:
            raise
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise InputError(
            f"cannot write {path}: {full.strerror} ({free / 2**20:.1f} MiB free in {path.parent}); {kept}"
        ) from None
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with `weights_only=True`; anything else (pickled code, a torn file) is an InputError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain values "
            f"(weights_only=True). Only load checkpoints you trust. Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def clean_tmp_files(run_dir: Path) -> list[Path]:
    """Remove tmp files a killed writer left behind; they are never read."""
    folder = checkpoint_dir(run_dir)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def find_resume(run_dir: Path) -> Path | None:
    """`latest.pt` when present, else the newest kept snapshot, else None."""
    folder = checkpoint_dir(run_dir)
    if (folder / LATEST).is_file():
        return folder / LATEST
    kept = sorted(folder.glob("step_*.pt"))
    return kept[-1] if kept else None


def keep_snapshot(run_dir: Path, step: int) -> Path:
    """Keep the current latest as `step_XXXXXXX.pt`: a hard link (latest is later replaced by a new
    file, never rewritten in place), or a copy where links are not supported."""
    folder = checkpoint_dir(run_dir)
    dst, tmp = folder / f"step_{step:07d}.pt", folder / f".step_{step:07d}.pt.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(folder / LATEST, tmp)
    except OSError:
        atomic_write(tmp, lambda f: f.write((folder / LATEST).read_bytes()))
    os.replace(tmp, dst)
    _fsync_dir(folder)
    return dst


# ---------------------------------------------------------------- RNG states as tensors and plain values


def rng_state(device_type: str) -> dict:
    """Python, NumPy, torch CPU and device generator states in a weights_only-loadable form."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device_type != "cpu":
        state["device"] = torch.get_device_module(device_type).get_rng_state()
    return state


def set_rng_state(state: dict, device_type: str) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device_type != "cpu" and "device" in state:
        torch.get_device_module(device_type).set_rng_state(state["device"])


def to_cpu(state: Any) -> Any:
    """A (nested) state with every tensor copied to the CPU, ready to pickle or save."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


# ---------------------------------------------------------------- final weights


def export_weights(state_dict: dict[str, torch.Tensor], model_config: dict, run_dir: Path) -> Path:
    """`model.safetensors` (contiguous CPU tensors) and `model_config.yaml` (the model and loss sections,
    enough for `build_model`), both written atomically."""
    run_dir = Path(run_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    path = run_dir / "model.safetensors"
    tmp = run_dir / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors creates it private; the weights are meant to be shared
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atomic_write(run_dir / "model_config.yaml", lambda f: f.write(yaml.safe_dump(model_config).encode()))
    return path
