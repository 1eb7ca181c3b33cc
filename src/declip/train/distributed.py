"""Device detection and the process group: Ascend NPU (HCCL), CUDA (NCCL) or CPU (gloo).

Launch several processes with torchrun; it sets RANK, WORLD_SIZE and LOCAL_RANK. Without those
variables training runs as one process with no process group at all.

Ascend: `torch_npu` is imported only here, guarded, and is never a declared dependency. PyTorch
auto-loads installed device extensions on `import torch`, so a `torch_npu` installed without a
working CANN toolkit breaks every `import torch`, even on a CPU run. On such machines export
`TORCH_DEVICE_BACKEND_AUTOLOAD=0`: torch then skips the auto-load, and the guarded import below
decides (see docs/ascend.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from declip.errors import InputError

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its device and its place in the job."""

    device: torch.device
    device_type: str  # "npu", "cuda" or "cpu"
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def npu_available() -> bool:
    """True when torch_npu imports and sees at least one NPU (the import registers `torch.npu`)."""
    try:
        import torch_npu  # noqa: F401
    except Exception:  # ImportError, or a torch_npu whose CANN libraries are missing
        return False
    return torch.npu.is_available()


def detect_device_type(override: str | None = None) -> str:
    """`override` when given (npu/cuda/cpu), else NPU when torch_npu works, else CUDA, else CPU."""
    if override:
        if override not in BACKENDS:
            raise ValueError(f"--device must be one of {sorted(BACKENDS)}, got {override!r}")
        if override == "npu" and not npu_available():
            raise InputError("--device npu: torch_npu does not import or sees no NPU (see docs/ascend.md)")
        if override == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is visible")
        return override
    if npu_available():
        return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bind(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    if hasattr(torch, "accelerator"):
        torch.accelerator.set_device_index(local_rank)
    else:
        getattr(torch, device_type).set_device(local_rank)
    return torch.device(device_type, local_rank)


def init_distributed(device: str | None = None, timeout_s: int = 600) -> DistEnv:
    """Detect the device, bind this rank to its local device and, under torchrun, join the process group."""
    device_type = detect_device_type(device)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _bind(device_type, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=BACKENDS[device_type],
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if device_type != "cpu" else None,
        )
    return DistEnv(dev, device_type, rank, world, local_rank)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def any_rank(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when `flag` holds on any rank. One 1-element all-reduce and one host sync."""
    x = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item() > 0)


def gather_to_main(obj) -> list | None:
    """Every rank's picklable `obj`, in rank order, on rank 0; None elsewhere.

    all_gather_object rather than gather_object: every backend (HCCL included) has all-gather.
    """
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out if is_main() else None
