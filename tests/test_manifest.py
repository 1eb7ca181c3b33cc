import json
import pickle
import tracemalloc

import numpy as np
import pytest

from declip.data import manifest
from declip.data.manifest import (
    ManifestIndex,
    RecordError,
    class_names,
    parse_json_object,
    parse_train_record,
    read_val_meta,
    scan_offsets,
)


def write_lines(path, lines, end=b"\n"):
    path.write_bytes(end.join(line.encode() if isinstance(line, str) else line for line in lines) + end)
    return path


def test_index_round_trip_and_cache(tmp_path):
    lines = [json.dumps({"caption": f"photo {i} ☃ éè", "filename": f"{i}.jpg"}, ensure_ascii=False) for i in range(50)]
    meta = write_lines(tmp_path / "m.jsonl", lines)
    idx = ManifestIndex(meta)
    data = meta.read_bytes()
    expected = np.array([0] + [i + 1 for i, b in enumerate(data[:-1]) if b == 10], dtype=np.uint64)
    assert np.array_equal(np.asarray(idx.offsets), expected)
    assert len(idx) == 50
    assert all(idx.line(i) == lines[i].encode() for i in range(50))
    assert idx.record(7)["caption"] == "photo 7 ☃ éè"
    assert idx.cache_path == tmp_path / "m.jsonl.idx.npy"
    assert isinstance(idx.offsets, np.memmap)

    # reused: a second index loads the cache without scanning
    mtime = idx.cache_path.stat().st_mtime_ns
    again = ManifestIndex(meta)
    assert again.cache_path.stat().st_mtime_ns == mtime and again.line(3) == lines[3].encode()

    # invalidated: a changed manifest (size and mtime differ) is re-indexed
    lines2 = ["{}", *lines[:10]]
    write_lines(meta, lines2)
    changed = ManifestIndex(meta)
    assert len(changed) == 11 and changed.line(1) == lines[0].encode()


def test_blank_lines_skipped_crlf_and_no_final_newline(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_bytes(b'{"a": 1}\r\n\r\n   \n{"a": 2}\r\n\n{"a": 3}')
    idx = ManifestIndex(meta)
    assert [idx.record(i)["a"] for i in range(len(idx))] == [1, 2, 3]
    assert [idx.line_number(i) for i in range(3)] == [1, 4, 6]
    assert idx.where(2) == f"{meta}:6"
    with pytest.raises(IndexError):
        idx.line(3)


def test_scan_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "_CHUNK", 7)  # lines and blank lines straddle every chunk boundary
    meta = tmp_path / "m.jsonl"
    meta.write_bytes(b'{"x": 10}\n\n \r\n{"x": 2000000}\n\n{"y": 3}\n  \n')
    offsets, blank = scan_offsets(meta)
    assert offsets.tolist() == [0, 14, 30]
    assert blank.tolist() == [2, 3, 5, 7]


def test_unwritable_beside_falls_back(tmp_path, monkeypatch):
    meta = write_lines(tmp_path / "m.jsonl", ['{"a": 1}', '{"a": 2}'])
    (tmp_path / "m.jsonl.idx.npy").mkdir()  # the cache path beside cannot be written (root ignores chmod)
    monkeypatch.setenv("DECLIP_INDEX_DIR", str(tmp_path / "cache"))
    idx = ManifestIndex(meta)
    assert idx.cache_path.parent == tmp_path / "cache" and idx.record(1) == {"a": 2}
    assert ManifestIndex(meta).cache_path == idx.cache_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.jsonl", "m.jsonl.idx.npy"]

    monkeypatch.setenv("DECLIP_INDEX_DIR", str(meta))  # a file: nothing writable, the index stays in memory
    (tmp_path / "cache").rename(tmp_path / "old")
    assert ManifestIndex(meta).cache_path is None and ManifestIndex(meta).line(0) == b'{"a": 1}'


def test_pickle_reopens_and_remaps(tmp_path):
    meta = write_lines(tmp_path / "m.jsonl", ['{"a": 1}', '{"a": 2}'])
    idx = ManifestIndex(meta)
    idx.line(0)  # opens the handle, which must not travel
    clone = pickle.loads(pickle.dumps(idx))
    assert isinstance(clone.offsets, np.memmap) and clone.record(1) == {"a": 2}
    assert len(pickle.dumps(idx)) < 2000


def test_large_manifest_memory(tmp_path):
    n = 100_000
    meta = tmp_path / "big.jsonl"
    with open(meta, "w") as f:
        for i in range(n):
            f.write(json.dumps({"caption": f"a photo number {i} of a thing", "filename": f"{i % 97}/{i}.jpg"}) + "\n")
    tracemalloc.start()
    idx = ManifestIndex(meta)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # offsets are 8 bytes per line (0.8 MB); records as Python dicts would be ~50 MB
    assert peak < 16 * 2**20, peak
    assert len(idx) == n
    assert idx.record(n - 1)["filename"] == f"{(n - 1) % 97}/{n - 1}.jpg"
    assert idx.line_number(n - 1) == n


def test_parse_train_record():
    assert parse_train_record({"caption": "a dog", "filename": "x.jpg", "url": "u"}, "f:1") == ("a dog", "x.jpg")
    assert parse_train_record({"caption": ["first", "second"], "filename": "x.jpg"}, "f:1") == ("first", "x.jpg")
    assert parse_train_record({"caption": "日本の犬 🐕", "filename": "y.jpg"}, "f:1")[0] == "日本の犬 🐕"
    cases = [
        ({"filename": "x.jpg"}, "missing_key", "missing key 'caption'"),
        ({"caption": "a"}, "missing_key", "missing key 'filename'"),
        ({"caption": "  ", "filename": "x"}, "empty_caption", "empty"),
        ({"caption": [], "filename": "x"}, "empty_caption", "empty list"),
        ({"caption": [3], "filename": "x"}, "bad_caption", "int"),
        ({"caption": 5, "filename": "x"}, "bad_caption", "int"),
        ({"caption": "a", "filename": ""}, "bad_filename", "non-empty"),
    ]
    for obj, kind, text in cases:
        with pytest.raises(RecordError, match=text) as e:
            parse_train_record(obj, "meta.json:12")
        assert e.value.kind == kind and str(e.value).startswith("meta.json:12: ")
    with pytest.raises(RecordError, match="meta.json:3: invalid JSON") as e:
        parse_json_object(b'{"caption": ', "meta.json:3")
    assert e.value.kind == "invalid_json"
    with pytest.raises(RecordError, match="expected a JSON object, got list"):
        parse_json_object(b"[1]", "meta.json:3")


def test_val_meta(tmp_path):
    rows = [("b.JPEG", 1, "dog"), ("a.JPEG", 0, "cat"), ("c.JPEG", 2, "hen"), ("d.JPEG", 1, "dog")]
    lines = [json.dumps({"filename": f, "label": y, "label_name": n}) for f, y, n in rows]
    meta = write_lines(tmp_path / "val.json", [lines[0], "", *lines[1:]])
    assert read_val_meta(meta) == [(f, y) for f, y, _ in rows]
    assert class_names(meta) == ["cat", "dog", "hen"]

    write_lines(meta, [*lines, json.dumps({"filename": "e", "label": 1, "label_name": "wolf"})])
    with pytest.raises(RecordError, match=r"val.json:5: label 1 is named 'wolf', but 'dog' at line 1"):
        class_names(meta)
    write_lines(meta, [lines[0], lines[2]])  # labels 1, 2: 0 missing
    with pytest.raises(RecordError, match=r"val.json: labels must be 0..K-1 without gaps; missing \[0\]"):
        class_names(meta)
    write_lines(meta, [lines[0], '{"filename": "x", "label": "3", "label_name": "y"}'])
    with pytest.raises(RecordError, match=r"val.json:2: 'label' must be int"):
        read_val_meta(meta)
