"""Stop a training before launch when this node has fewer accelerators than the target needs.

    check_devices.py --target full_8p --need 8

Counts NPUs through torch_npu (and `npu-smi` when torch_npu does not import, to tell a broken
software stack from missing hardware) and CUDA devices through torch; the visible-device variables
apply. Eight processes on a CPU would "work" for hours and measure nothing, so a shortfall is an
error; a one-device target on a machine without any accelerator runs on CPU with a warning.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys


def npu_smi_count() -> int | None:
    """NPUs the driver reports (`npu-smi info -l`), or None without npu-smi."""
    if shutil.which("npu-smi") is None:
        return None
    try:
        out = subprocess.run(["npu-smi", "info", "-l"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Total Count\s*:\s*(\d+)", out)
    return int(match.group(1)) if match else None


def torch_counts() -> dict[str, int]:
    import torch

    from declip.train.distributed import npu_available

    return {
        "npu": torch.npu.device_count() if npu_available() else 0,
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def verdict(target: str, need: int, counts: dict[str, int], smi: int | None) -> tuple[bool, str]:
    """(ok, message) for a target that needs `need` devices per node."""
    kind, have = max(counts.items(), key=lambda kv: kv[1])
    found = f"found {counts['npu']} NPU(s) via torch_npu, {counts['cuda']} CUDA device(s)"
    if smi is not None:
        found += f", npu-smi reports {smi}"
    if have >= need and have > 0:
        return True, f"{target}: {need} device(s) per node needed, {found}: using {kind}"
    if need <= 1:
        return True, f"warning: {target}: {found}; training on CPU"
    hint = ""
    if smi and not counts["npu"]:
        hint = " (npu-smi sees NPUs but torch_npu does not: is CANN's set_env.sh sourced? see docs/ascend.md)"
    return False, f"{target} needs {need} devices per node but {found}{hint}; stopping before training"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--need", type=int, required=True, help="devices per node; 0: CPU target, nothing to check")
    args = parser.parse_args(argv)
    if args.need == 0:
        print(f"{args.target}: CPU target, no accelerator needed")
        return 0
    ok, message = verdict(args.target, args.need, torch_counts(), npu_smi_count())
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
