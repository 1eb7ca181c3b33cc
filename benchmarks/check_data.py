"""check-data throughput in stat mode: lines/s per core on a synthetic YFCC15M-like manifest.

    python benchmarks/check_data.py [--lines N] [--quick] [--workers W] [--append docs/performance.md]

Writes a manifest of N lines (default 1M; --quick: 100k) shaped like the real one (caption, filename
two folders deep, url) into a temp dir; 95% of the lines point at existing (tiny) files, the rest at
missing ones, and 1 in 1000 lines is broken JSON. Goal: >= 20k lines/s per core.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from common import report  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from declip.data.check import check_data

GOAL = 20_000


def make_world(d: Path, lines: int, files: int = 5000) -> tuple[Path, Path]:
    rng = random.Random(0)
    root = d / "images"
    names = [f"{i % 100:02d}/{i // 100 % 100:02d}/{i:08x}.jpg" for i in range(files)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"\xff\xd8 not decoded in stat mode")
    words = [
        "a",
        "the",
        "photo",
        "of",
        "dog",
        "cat",
        "street",
        "city",
        "night",
        "sunset",
        "beach",
        "mountain",
        "tree",
        "red",
        "old",
        "people",
        "car",
    ]
    meta = d / "meta.jsonl"
    with open(meta, "w") as f:
        for n in range(lines):
            if n % 1000 == 999:
                f.write('{"caption": "cut off\n')
                continue
            name = names[n % files] if rng.random() < 0.95 else f"zz/missing/{n:08x}.jpg"
            caption = " ".join(rng.choices(words, k=rng.randint(3, 15)))
            url = f"http://farm{n % 9}.staticflickr.com/{n}/{n:010d}_{n % 997:04x}.jpg"
            f.write(json.dumps({"caption": caption, "filename": name, "url": url}) + "\n")
    return meta, root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="100k lines")
    p.add_argument("--workers", type=int, default=1, help="processes (the per-core rate divides by this)")
    p.add_argument("--append", type=Path, help="append the result row to this Markdown file")
    args = p.parse_args()
    lines = 100_000 if args.quick else args.lines
    with tempfile.TemporaryDirectory() as tmp:
        meta, root = make_world(Path(tmp), lines)
        summary = check_data(meta, root, Path(tmp) / "out", workers=args.workers)
    per_core = summary["lines_per_s"] / args.workers
    result = (
        f"{per_core:,.0f} lines/s per core ({summary['total']:,} lines, {args.workers} worker(s), "
        f"{summary['wall_time_s']:.1f} s)"
    )
    verdict = f"goal {'met' if per_core >= GOAL else 'NOT met'}: {per_core:,.0f} vs {GOAL:,} lines/s per core"
    report("check-data (stat mode)", result, f">= {GOAL:,} lines/s per core", verdict, args.append)


if __name__ == "__main__":
    main()
