"""`declip check-data`: validate every line of a training manifest, keep the good ones.

The manifest is split into byte ranges that worker processes validate independently (a
range owns the lines that start inside it), so 15M lines never become Python objects in
one process. Each worker writes its good lines, byte for byte, to a part file; the parts
are concatenated in order into `clean.jsonl`. Blank lines are dropped and counted apart.

Checks per line: a JSON object; `caption` and `filename` present (extra keys are fine);
caption a non-empty string, or a list whose first entry is one; filename a relative path
that stays inside root, symlinks resolved; the image a regular, non-empty file. With
`decode`, the image is also opened, verified and fully decoded (a reduced-scale JPEG decode
still reads every byte, so truncation is caught); images over `MAX_PIXELS` are rejected as
decompression bombs. Non-RGB images are fine (training converts them).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from declip.data.manifest import RecordError, parse_json_object, parse_train_record
from declip.errors import InputError

# 10k x 10k: larger images count as decompression bombs (`too_large`); the loaders refuse them too.
MAX_PIXELS = 100_000_000

EXAMPLES = 5
_MIN_CHUNK = 1 << 20


def _chunks(size: int, workers: int) -> list[tuple[int, int]]:
    n = max(1, min(workers * 8, size // _MIN_CHUNK))  # several per worker: balance and progress
    bounds = [size * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class ImagePaths:
    """Resolves manifest filenames inside root, refusing escapes (absolute, `..`, symlinks out of root).

    Shared by check-data and the training loader, so a record check-data rejects can never be read in training.
    Directory resolutions are cached (they repeat a lot)."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        self.prefix = self.root.rstrip(os.sep) + os.sep
        self.dirs: dict[str, bool] = {}

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.prefix)

    def check(self, filename: str) -> tuple[str, str] | str:
        """The image's path, or (kind, reason)."""
        if os.path.isabs(filename) or filename.startswith("~"):
            return "unsafe_path", f"absolute filename {filename!r}"
        norm = os.path.normpath(filename)
        if norm == ".." or norm.startswith(".." + os.sep) or "\0" in norm:
            return "unsafe_path", f"filename {filename!r} escapes the root"
        path = os.path.join(self.root, norm)
        parent = os.path.dirname(norm)
        if parent not in self.dirs:
            self.dirs[parent] = self._inside(os.path.realpath(os.path.join(self.root, parent)))
        if not self.dirs[parent]:
            return "unsafe_path", f"filename {filename!r}: a folder symlink leaves the root"
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not self._inside(os.path.realpath(path)):
                    return "unsafe_path", f"filename {filename!r} is a symlink out of the root"
                st = os.stat(path)
        except FileNotFoundError:
            return "missing_image", f"image {path} does not exist"
        except OSError as e:
            return "missing_image", f"image {path}: {e.strerror}"
        if not stat.S_ISREG(st.st_mode):
            return "not_a_file", f"image {path} is not a regular file"
        if st.st_size == 0:
            return "empty_image", f"image {path} is empty (0 bytes)"
        return path


def _decode_problem(path: str) -> tuple[str, str] | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is below
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    return "too_large", f"image {path}: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels"
                img.verify()
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft(img.mode, (img.width // 8, img.height // 8))
                img.load()
    except Image.DecompressionBombError as e:
        return "too_large", f"image {path}: {e}"
    except Exception as e:  # noqa: BLE001 (any failure to decode is this image's defect)
        return "corrupt_image", f"image {path}: {type(e).__name__}: {e}"
    return None


def check_line(line: bytes, where: str, paths: ImagePaths, decode: bool) -> tuple[str, str] | None:
    """(kind, reason) of a manifest line's first defect, or None when it is usable."""
    try:
        _, filename = parse_train_record(parse_json_object(line, where), where)
    except RecordError as e:
        return e.kind, str(e).removeprefix(f"{where}: ")
    found = paths.check(filename)
    if isinstance(found, tuple):
        return found
    return _decode_problem(found) if decode else None


def _check_range(job: tuple[str, str, str, int, int, int, bool]) -> dict[str, Any]:
    """Validate the lines starting in [start, end); good lines go to part_path."""
    meta, root, part_path, start, end, k, decode = job
    paths = ImagePaths(Path(root))
    bad: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    lines = blank = 0
    with open(meta, "rb") as f, open(part_path, "wb") as out:
        if start > 0:  # the line running into this range belongs to the previous one
            f.seek(start - 1)
            f.readline()
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            lines += 1
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                blank += 1
                continue
            problem = check_line(line, f"{meta}:{lines}", paths, decode)
            if problem is None:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            kind, reason = problem
            bad[kind] += 1
            if len(examples.setdefault(kind, [])) < EXAMPLES:
                examples[kind].append({"line": lines, "reason": reason})  # local number, fixed by the parent
    return {"k": k, "lines": lines, "blank": blank, "bad": bad, "examples": examples, "bytes": end - start}


def _require_inputs(meta: Path, root: Path, out_dir: Path) -> None:
    if not meta.is_file():
        raise InputError(f"manifest not found: {meta}")
    if not os.access(meta, os.R_OK):
        raise InputError(f"manifest not readable: {meta}")
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"image root is not a readable folder: {root}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"output folder not writable: {out_dir}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_data(meta: Path, root: Path, out_dir: Path, decode: bool = False, workers: int | None = None) -> dict:
    """Validate `meta` against `root`; write `clean.jsonl` and `data_check.json` into out_dir."""
    from tqdm import tqdm

    meta, root, out_dir = Path(meta), Path(root), Path(out_dir)
    _require_inputs(meta, root, out_dir)
    t0 = time.perf_counter()
    workers = max(1, workers or os.cpu_count() or 1)
    size = meta.stat().st_size
    tag = f".part.{os.getpid()}"
    jobs = [
        (str(meta), str(root), str(out_dir / f"{tag}.{k:05d}"), a, b, k, decode)
        for k, (a, b) in enumerate(_chunks(size, workers))
    ]
    results: list[dict[str, Any]] = []
    pool = None
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc="check-data", file=sys.stderr, leave=False) as bar:
            if workers == 1 or len(jobs) == 1:
                done = map(_check_range, jobs)
            else:
                # spawn: the caller may hold threads (torch) that a fork would copy in a broken state
                pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
                done = pool.imap_unordered(_check_range, jobs)
            for r in done:
                results.append(r)
                bar.update(r["bytes"])
        results.sort(key=lambda r: r["k"])
        clean_tmp = out_dir / f".clean.jsonl{tag}.tmp"
        with open(clean_tmp, "wb") as out:
            for job in jobs:
                with open(job[2], "rb") as part:
                    while block := part.read(1 << 24):
                        out.write(block)
        os.replace(clean_tmp, out_dir / "clean.jsonl")
    finally:
        if pool is not None:
            pool.terminate()
        for job in jobs:
            Path(job[2]).unlink(missing_ok=True)

    bad: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    first_line = 1
    for r in results:
        bad.update(r["bad"])
        for kind, found in r["examples"].items():
            slot = examples.setdefault(kind, [])
            for ex in found[: EXAMPLES - len(slot)]:
                slot.append({"line": first_line + ex["line"] - 1, "file": str(meta), "reason": ex["reason"]})
        first_line += r["lines"]
    blank = sum(r["blank"] for r in results)
    total = sum(r["lines"] for r in results) - blank
    wall = time.perf_counter() - t0
    summary = {
        "meta": str(meta),
        "root": str(root),
        "decode": decode,
        "total": total,
        "ok": total - sum(bad.values()),
        "bad": dict(sorted(bad.items())),
        "examples": {k: examples[k] for k in sorted(examples)},
        "blank_lines": blank,
        "workers": workers,
        "wall_time_s": round(wall, 3),
        "lines_per_s": round(total / wall, 1) if wall > 0 else 0.0,
    }
    _write_atomic(out_dir / "data_check.json", json.dumps(summary, indent=2) + "\n")
    for kind, n in summary["bad"].items():
        print(f"  {kind}: {n} (first at {meta}:{examples[kind][0]['line']})", file=sys.stderr)
    return summary
