"""Two-view decode + augment throughput, one process, one thread: ours vs plain torchvision.

    python benchmarks/augment.py [--size 224] [--samples N] [--quick] [--append docs/performance.md]

Both sides produce the reference's two MoCo-v2 views of the same photograph-like JPEGs (64 files,
500x375 and 640x427, quality 90, read from the page cache). The baseline is the classic recipe:
PIL full decode once, `torchvision.transforms.Compose` of the v1 ops applied per view
(MoCo's TwoCropsTransform). Ours is `declip.data.transforms.TwoViewTransform`. Goal: >= 2x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402 (the shared Markdown row helpers)

from declip.data.transforms import MEAN, STD, TwoViewTransform, blur_kernel_size  # noqa: E402

GOAL = 2.0


def photo(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Natural-image-like content: smooth colour gradients, soft shapes, texture noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / (w + h) + 0.5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(4, 12)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.25) * w
        mask = np.clip(1.5 - np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / r, 0, 1)[..., None]
        img = img * (1 - mask) + rng.uniform(0, 255, 3) * mask
    img += rng.normal(0, 6, img.shape) + 10 * np.sin(x / rng.uniform(3, 20))[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def baseline(size: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def rates(fns: list, files: list[Path], samples: int, rounds: int = 3) -> list[float]:
    """Samples per CPU-second of each fn: the best of interleaved rounds.

    CPU time of this (single-threaded) process, not wall time, so that other processes on a
    shared machine do not count against either side.
    """
    best = [0.0] * len(fns)
    for f in files[:4]:  # warm up
        for fn in fns:
            fn(f)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = time.process_time()
            for i in range(samples):
                fn(files[i % len(files)])
            best[k] = max(best[k], samples / (time.process_time() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--samples", type=int, default=256, help="per round; best of 3 rounds")
    p.add_argument("--quick", action="store_true", help="64 samples per round")
    p.add_argument("--append", type=Path, help="append the result row to this Markdown file")
    args = p.parse_args()
    samples = 64 if args.quick else args.samples
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(64):
            path = Path(tmp) / f"{i}.jpg"
            photo(*((500, 375) if i % 2 else (640, 427)), rng).save(path, "JPEG", quality=90)
            files.append(path)
        tv = baseline(args.size)

        def base(path: Path) -> torch.Tensor:
            img = Image.open(path).convert("RGB")
            return torch.stack([tv(img), tv(img)])

        ours = TwoViewTransform(args.size)
        g = torch.Generator().manual_seed(0)
        r_base, r_ours = rates([base, lambda path: ours(path, g)], files, samples)
    ratio = r_ours / r_base
    result = (
        f"{r_ours:,.1f} vs {r_base:,.1f} two-view samples/s per core at {args.size} px: **{ratio:.2f}x** "
        f"(best of 3 x {samples} samples)"
    )
    verdict = (
        f"goal {'met' if ratio >= GOAL else 'NOT met'}: {ratio:.2f}x vs {GOAL}x (OMP threads: 1, pid {os.getpid()})"
    )
    report("augment: ours vs torchvision", result, f">= {GOAL}x", verdict, args.append)


if __name__ == "__main__":
    main()
