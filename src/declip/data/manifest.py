"""JSON Lines manifests: a byte-offset index for random access, record parsing, val meta.

The training manifest has 15.4M lines (3.3 GB). Holding them as Python objects
would cost tens of GB per DataLoader worker, so, like the reference, we seek to
each line by byte offset. The offsets are found once with a chunked binary scan
and cached as a `.npy` that every process maps read-only (the pages are shared).

Blank (empty or whitespace-only) lines are skipped by the index: they carry no
sample, and `declip check-data` drops them from `clean.jsonl`. Line numbers in
messages are the 1-based line numbers of the file, blank lines counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # 4 MiB per read: large enough that numpy, not Python, does the scanning
_WHITESPACE = b" \t\r\n\f\v"


class RecordError(ValueError):
    """A manifest record is unusable; `kind` names the defect (as counted by check-data)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------- the index


def scan_offsets(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets of the non-blank lines of `path` and the 1-based numbers of the blank ones."""
    starts: list[np.ndarray] = []
    blank: list[int] = []
    space = np.zeros(256, dtype=bool)
    space[list(_WHITESPACE)] = True
    line_no = 0  # lines completed before the current chunk
    line_start = 0  # offset where the current (unfinished) line began
    with open(path, "rb") as f:
        fd = f.fileno()
        base = 0
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            data = np.frombuffer(buf, dtype=np.uint8)
            nl = np.flatnonzero(data == 10).astype(np.int64) + base
            if len(nl):
                line_starts = np.concatenate(([line_start], nl[:-1] + 1))
                first = data[np.clip(line_starts - base, 0, len(data) - 1)]
                # Only a line that starts with whitespace (or is empty) can be blank; JSON lines start
                # with '{', so Python looks at very few lines.
                keep = np.ones(len(nl), dtype=bool)
                for k in np.flatnonzero(space[first] | (line_starts < base)):
                    a, b = int(line_starts[k]), int(nl[k])
                    if not os.pread(fd, b - a, a).strip(_WHITESPACE):
                        keep[k] = False
                        blank.append(line_no + int(k) + 1)
                starts.append(line_starts[keep])
                line_no += len(nl)
                line_start = int(nl[-1]) + 1
            base += len(buf)
        if line_start < base:  # a last line without a trailing newline
            if os.pread(fd, base - line_start, line_start).strip(_WHITESPACE):
                starts.append(np.array([line_start], dtype=np.int64))
            else:
                blank.append(line_no + 1)
    offsets = np.concatenate(starts).astype(np.uint64) if starts else np.zeros(0, dtype=np.uint64)
    return offsets, np.array(blank, dtype=np.int64)


def _fallback_dir() -> Path:
    return Path(os.environ.get("DECLIP_INDEX_DIR", "resources/manifest_index"))


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class ManifestIndex:
    """Random access to the lines of a JSON Lines file; cached offsets, shared pages.

    The cache lives beside the manifest (`<manifest>.idx.npy` + `<manifest>.idx.json`,
    the stamp: size, mtime_ns, blank lines). When that folder is read-only it goes to
    `$DECLIP_INDEX_DIR` (default `resources/manifest_index`) under a hash of the
    absolute path; when nothing is writable the index stays in memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest not found: {self.path}")
        self._fh = None
        self._pid = -1
        self.cache_path: Path | None = None
        self._load_or_build()

    # -- cache
    def _cache_candidates(self) -> list[Path]:
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:24]
        return [self.path.with_name(self.path.name + ".idx.npy"), _fallback_dir() / f"{digest}.idx.npy"]

    def _load_or_build(self) -> None:
        stamp = _stamp(self.path)
        candidates = self._cache_candidates()
        for npy in candidates:
            meta = npy.with_suffix(".json")
            try:
                saved = json.loads(meta.read_text())
                if saved["size"] != stamp["size"] or saved["mtime_ns"] != stamp["mtime_ns"]:
                    continue
                offsets = np.load(npy, mmap_mode="r")
                if len(offsets) != saved["lines"]:
                    continue
            except (OSError, ValueError, KeyError):
                continue
            self._set(offsets, np.array(saved["blank"], dtype=np.int64), npy)
            return
        offsets, blank = scan_offsets(self.path)
        record = {**stamp, "lines": len(offsets), "blank": blank.tolist()}
        for npy in candidates:
            tmp = npy.with_name(f"{npy.name}.{os.getpid()}.tmp")
            meta_tmp = npy.with_name(f"{npy.stem}.json.{os.getpid()}.tmp")
            try:
                npy.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as f:
                    np.save(f, offsets)
                os.replace(tmp, npy)
                meta_tmp.write_text(json.dumps(record))
                os.replace(meta_tmp, npy.with_suffix(".json"))
            except OSError:
                for path in (tmp, meta_tmp):
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            self._set(np.load(npy, mmap_mode="r"), blank, npy)
            return
        log.warning("manifest index of %s could not be cached anywhere; keeping it in memory", self.path)
        self._set(offsets, blank, None)

    def _set(self, offsets: np.ndarray, blank: np.ndarray, cache_path: Path | None) -> None:
        self.offsets = offsets
        self.cache_path = cache_path
        self.blank_lines = blank
        # kept line i is preceded by #{j : blank[j] - 1 - j <= i} blank lines
        self._blank_keys = blank - 1 - np.arange(len(blank))

    # -- pickling: DataLoader workers (spawn) re-map the cache instead of copying it
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__, _fh=None, _pid=-1)
        if self.cache_path is not None:
            state["offsets"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.offsets is None:
            self.offsets = np.load(self.cache_path, mmap_mode="r")

    # -- access
    def __len__(self) -> int:
        return len(self.offsets)

    def line_number(self, i: int) -> int:
        """The 1-based file line number of record i."""
        return int(i) + 1 + int(np.searchsorted(self._blank_keys, i, side="right"))

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line_number(i)}"

    def line(self, i: int) -> bytes:
        """Record i's raw line, without its line terminator."""
        if not 0 <= i < len(self.offsets):
            raise IndexError(f"{self.path}: record {i} out of range (0..{len(self.offsets) - 1})")
        if self._pid != os.getpid():  # a forked worker must not share the parent's file position
            self._fh = open(self.path, "rb")  # noqa: SIM115 (lives as long as the index)
            self._pid = os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return self._fh.readline().rstrip(b"\r\n")

    def record(self, i: int) -> dict[str, Any]:
        """Record i parsed as a JSON object; errors name file:line."""
        return parse_json_object(self.line(i), self.where(i))


# ---------------------------------------------------------------- records


def parse_json_object(line: bytes | str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError("invalid_json", f"{where}: invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RecordError("not_object", f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_train_record(obj: dict[str, Any], where: str) -> tuple[str, str]:
    """(caption, filename) of a training record; a list caption gives its first entry."""
    for key in ("caption", "filename"):
        if key not in obj:
            raise RecordError("missing_key", f"{where}: missing key '{key}'")
    caption = obj["caption"]
    if isinstance(caption, list):
        if not caption:
            raise RecordError("empty_caption", f"{where}: caption is an empty list")
        caption = caption[0]
    if not isinstance(caption, str):
        raise RecordError("bad_caption", f"{where}: caption must be a string, got {type(caption).__name__}")
    if not any(c.isprintable() and not c.isspace() for c in caption):
        raise RecordError("empty_caption", f"{where}: caption is empty (nothing but whitespace or control characters)")
    filename = obj["filename"]
    if not isinstance(filename, str) or not filename:
        raise RecordError("bad_filename", f"{where}: filename must be a non-empty string, got {filename!r}")
    return caption, filename


def _val_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"val meta not found: {path}")
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            obj = parse_json_object(line, where)
            for key, tp in (("filename", str), ("label", int), ("label_name", str)):
                if key not in obj:
                    raise RecordError("missing_key", f"{where}: missing key '{key}'")
                if not isinstance(obj[key], tp) or isinstance(obj[key], bool):
                    raise RecordError("bad_value", f"{where}: '{key}' must be {tp.__name__}, got {obj[key]!r}")
            if obj["label"] < 0:
                raise RecordError("bad_value", f"{where}: negative label {obj['label']}")
            out.append((n, obj))
    return out


def read_val_meta(path: str | Path) -> list[tuple[str, int]]:
    """(filename, label) per zero-shot record, in file order."""
    return [(obj["filename"], obj["label"]) for _, obj in _val_records(path)]


def class_names(path: str | Path) -> list[str]:
    """`label_name` per label 0..K-1; every label must occur and keep one name."""
    names: dict[int, tuple[str, int]] = {}
    for n, obj in _val_records(path):
        label, name = obj["label"], obj["label_name"]
        if label in names and names[label][0] != name:
            first, first_line = names[label]
            raise RecordError(
                "bad_value", f"{path}:{n}: label {label} is named {name!r}, but {first!r} at line {first_line}"
            )
        names.setdefault(label, (name, n))
    missing = sorted(set(range(max(names, default=-1) + 1)) - names.keys())
    if not names or missing:
        raise RecordError("bad_value", f"{path}: labels must be 0..K-1 without gaps; missing {missing[:10] or 'all'}")
    return [names[k][0] for k in range(len(names))]
