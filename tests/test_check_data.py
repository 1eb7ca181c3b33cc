import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from declip.cli import main
from declip.data import check
from declip.data.check import check_data
from declip.errors import InputError


def jpeg_bytes(w=40, h=30, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def world(tmp_path):
    """A root with good and broken images, and a manifest with one line per defect kind."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes())
    (root / "good.jpg").write_bytes(jpeg_bytes())
    (root / "sub" / "good2.jpg").write_bytes(jpeg_bytes(seed=1))
    Image.new("L", (20, 20), 128).save(root / "gray.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg_bytes(200, 150)[:1500])
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "adir.jpg").mkdir()
    os.symlink(outside / "secret.jpg", root / "link_out.jpg")
    os.symlink(root / "good.jpg", root / "link_in.jpg")
    os.symlink(outside, root / "dir_out")

    def rec(caption, filename="good.jpg", **extra):
        return json.dumps({"caption": caption, "filename": filename, **extra}, ensure_ascii=False)

    # (line, expected kind or None for good, stat-mode kind when decode=False)
    lines = [
        (rec("a dog on grass", url="http://x", extra_key=1), None),  # extra keys are fine
        (rec(["first caption", "second"], "sub/good2.jpg"), None),
        (rec("ünïcödé 猫 caption", "gray.png"), None),
        ('{"caption": "broken", "filename": ', "invalid_json"),
        ("[1, 2]", "not_object"),
        (json.dumps({"filename": "good.jpg"}), "missing_key"),
        (rec("   "), "empty_caption"),
        (rec([]), "empty_caption"),
        (rec(42), "bad_caption"),
        (rec("a", 7), "bad_filename"),
        (rec("abs", str(root / "good.jpg")), "unsafe_path"),
        (rec("dotdot", "../outside/secret.jpg"), "unsafe_path"),
        (rec("sym", "link_out.jpg"), "unsafe_path"),
        (rec("symdir", "dir_out/secret.jpg"), "unsafe_path"),
        (rec("ok symlink inside", "link_in.jpg"), None),
        (rec("ok dots inside", "sub/../good.jpg"), None),
        (rec("missing", "nope.jpg"), "missing_image"),
        (rec("dir", "adir.jpg"), "not_a_file"),
        (rec("zero", "empty.jpg"), "empty_image"),
        (rec("trunc", "truncated.jpg"), "corrupt_image"),
        (rec("text", "text.jpg"), "corrupt_image"),
    ]
    meta = tmp_path / "meta.jsonl"
    # a blank line in the middle shifts the line numbers of what follows
    raw = [line for line, _ in lines[:5]] + [""] + [line for line, _ in lines[5:]]
    meta.write_text("\n".join(raw) + "\n")
    numbers = list(range(1, 6)) + list(range(7, len(lines) + 2))
    return meta, root, [(n, line, kind) for n, (line, kind) in zip(numbers, lines, strict=True)]


DECODE_ONLY = {"corrupt_image"}


@pytest.mark.parametrize("decode", [False, True])
def test_every_defect_caught_with_line_numbers(world, tmp_path, decode):
    meta, root, lines = world
    out = tmp_path / "out"
    summary = check_data(meta, root, out, decode=decode, workers=1)
    expected = {}
    for n, _, kind in lines:
        if kind and (decode or kind not in DECODE_ONLY):
            expected.setdefault(kind, []).append(n)
    assert summary["total"] == len(lines) and summary["blank_lines"] == 1
    assert summary["bad"] == {k: len(v) for k, v in expected.items()}
    assert summary["ok"] == len(lines) - sum(summary["bad"].values())
    for kind, numbers in expected.items():
        assert [e["line"] for e in summary["examples"][kind]] == numbers
        assert all(e["file"] == str(meta) and e["reason"] for e in summary["examples"][kind])
    assert json.loads((out / "data_check.json").read_text()) == summary
    good = [line for n, line, kind in lines if kind is None or (not decode and kind in DECODE_ONLY)]
    assert (out / "clean.jsonl").read_bytes() == ("\n".join(good) + "\n").encode()
    assert sorted(p.name for p in out.iterdir()) == ["clean.jsonl", "data_check.json"]
    for key in ("meta", "root", "decode", "wall_time_s", "lines_per_s"):
        assert key in summary


def test_reasons_are_specific(world, tmp_path):
    meta, root, _ = world
    ex = check_data(meta, root, tmp_path / "out", decode=True, workers=1)["examples"]
    assert "missing key 'caption'" in ex["missing_key"][0]["reason"]
    assert "truncated" in ex["corrupt_image"][0]["reason"]
    assert "cannot identify" in ex["corrupt_image"][1]["reason"]
    assert "symlink" in ex["unsafe_path"][2]["reason"]


def test_ranges_and_processes_agree(world, tmp_path, monkeypatch):
    meta, root, _ = world
    serial = check_data(meta, root, tmp_path / "a", workers=1)
    monkeypatch.setattr(check, "_MIN_CHUNK", 50)  # many byte ranges: lines straddle range boundaries
    ranged = check_data(meta, root, tmp_path / "b", workers=1)
    parallel = check_data(meta, root, tmp_path / "c", workers=2)
    for other in (ranged, parallel):
        assert {k: other[k] for k in ("total", "ok", "bad", "examples")} == {
            k: serial[k] for k in ("total", "ok", "bad", "examples")
        }
    clean = (tmp_path / "a" / "clean.jsonl").read_bytes()
    assert (tmp_path / "b" / "clean.jsonl").read_bytes() == clean == (tmp_path / "c" / "clean.jsonl").read_bytes()


def test_crlf_and_missing_final_newline(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    meta = tmp_path / "m.jsonl"
    meta.write_bytes(b'{"caption": "x", "filename": "a.jpg"}\r\n{"caption": "y", "filename": "a.jpg"}')
    summary = check_data(meta, root, tmp_path / "out", workers=1)
    assert summary["ok"] == 2
    assert (tmp_path / "out" / "clean.jsonl").read_bytes() == meta.read_bytes() + b"\n"


def test_too_large_image(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "MAX_PIXELS", 1000)
    root = tmp_path / "r"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes(40, 30))  # 1200 pixels
    meta = tmp_path / "m.jsonl"
    meta.write_text('{"caption": "x", "filename": "a.jpg"}\n')
    assert check_data(meta, root, tmp_path / "out", decode=True, workers=1)["bad"] == {"too_large": 1}


def test_unusable_inputs(tmp_path, capsys):
    root = tmp_path / "r"
    root.mkdir()
    meta = tmp_path / "m.jsonl"
    meta.write_text("{}\n")
    with pytest.raises(InputError, match="manifest not found: .*nope.jsonl"):
        check_data(tmp_path / "nope.jsonl", root, tmp_path / "out")
    with pytest.raises(InputError, match="image root is not a readable folder"):
        check_data(meta, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(InputError, match="cannot create the output folder"):
        check_data(meta, root, meta / "out")
    assert main(["check-data", "--meta", str(tmp_path / "nope.jsonl"), "--root", str(root), "--out", "x"]) == 2
    assert "manifest not found" in capsys.readouterr().err
