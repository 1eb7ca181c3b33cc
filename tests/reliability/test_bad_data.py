"""Bad data: every defect is reported by `declip check-data` with its line, the training loader never
crashes on it and counts what it replaced, and hostile captions cost milliseconds.

Decisions (docs/reliability.md): CMYK, 16-bit, palette (with transparency), animated GIF/APNG (first
frame) and a PNG named .jpg are images, converted to RGB; a caption of only control characters is
empty; extra JSON keys are fine; a 1 MB caption is valid and truncated to the context.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import string
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from faults import TINY, overrides
from PIL import Image

from declip.cli import main
from declip.config import load_config
from declip.data.datasets import TrainDataset, collate
from declip.errors import InputError
from declip.text.tokenizer import EOT_ID, SOT_ID, Tokenizer

pytestmark = pytest.mark.reliability

BIG = 1 << 20  # a 1 MB caption


def image(mode: str, size=(40, 30), seed=0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode) if mode != "I;16" else Image.fromarray(a[..., 0].astype(np.uint16) * 257)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images of every kind, and a manifest with one line per case: (line number, kind or None)."""
    base = tmp_path_factory.mktemp("bad_data")
    root, outside = base / "images", base / "outside"
    root.mkdir()
    outside.mkdir()
    files = {
        "good.jpg": encoded(image("RGB"), "JPEG"),
        "cmyk.jpg": encoded(image("CMYK", seed=1), "JPEG"),
        "gray16.png": encoded(image("I;16", seed=2), "PNG"),
        "palette.png": encoded(image("P", seed=3), "PNG"),
        "palette_alpha.png": encoded(image("P", seed=4), "PNG", transparency=0),
        "png_named.jpg": encoded(image("RGB", seed=5), "PNG"),
        "animated_gif.jpg": encoded(image("P", seed=6), "GIF", save_all=True,
                                    append_images=[image("P", seed=7), image("P", seed=8)], duration=50, loop=0),
        "animated_png.jpg": encoded(image("RGB", seed=9), "PNG", save_all=True,
                                    append_images=[image("RGB", seed=10)], duration=50),
        "empty.jpg": b"",
        "truncated.jpg": encoded(image("RGB", (200, 150), seed=11), "JPEG")[:1500],
        "text.jpg": b"<html>not an image</html>\n",
        "bomb.png": png_bomb(100_000, 100_000),  # 10^10 pixels, 30 GB as RGB: must never be allocated
    }  # fmt: skip
    for name, data in files.items():
        (root / name).write_bytes(data)
    (outside / "secret.jpg").write_bytes(files["good.jpg"])
    os.symlink(outside / "secret.jpg", root / "link_out.jpg")
    os.symlink(outside, root / "dir_out")
    assert Image.open(root / "animated_gif.jpg").n_frames == 3 and Image.open(root / "animated_png.jpg").n_frames == 2
    assert Image.open(root / "cmyk.jpg").mode == "CMYK" and Image.open(root / "gray16.png").mode.startswith("I")

    rng = random.Random(0)
    huge = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(9)) for _ in range(BIG // 10))

    def rec(caption, filename="good.jpg", **extra) -> str:
        return json.dumps({"caption": caption, "filename": filename, **extra})

    cases = [
        (rec("a photo", url="http://x", extra="keys are fine"), None),
        (rec("cmyk", "cmyk.jpg"), None),
        (rec("16 bit", "gray16.png"), None),
        (rec("palette", "palette.png"), None),
        (rec("palette with transparency", "palette_alpha.png"), None),
        (rec("png with a jpeg name", "png_named.jpg"), None),
        (rec("animated gif", "animated_gif.jpg"), None),
        (rec("animated png", "animated_png.jpg"), None),
        (rec(huge), None),
        (rec("tabs\tand\x07bells\x1b[0m in a caption"), None),
        (rec("zero bytes", "empty.jpg"), "empty_image"),
        (rec("truncated", "truncated.jpg"), "corrupt_image"),
        (rec("html named jpg", "text.jpg"), "corrupt_image"),
        (rec("bomb", "bomb.png"), "too_large"),
        (rec(""), "empty_caption"),
        (rec("\x00\x01\x02\x7f\u200b \t\x1f" * 1000), "empty_caption"),
        (rec(None), "bad_caption"),
        (rec(42), "bad_caption"),
        (rec({"text": "a dict"}), "bad_caption"),
        ('{"caption": "cut here", "filename": "go', "invalid_json"),
        ("[1, 2]", "not_object"),
        (json.dumps({"filename": "good.jpg"}), "missing_key"),
        (json.dumps({"caption": "no file"}), "missing_key"),
        (rec("absolute", str(root / "good.jpg")), "unsafe_path"),
        (rec("dotdot", "../outside/secret.jpg"), "unsafe_path"),
        (rec("symlink out", "link_out.jpg"), "unsafe_path"),
        (rec("folder symlink out", "dir_out/secret.jpg"), "unsafe_path"),
    ]
    meta = base / "train.jsonl"
    meta.write_text("".join(line + "\n" for line, _ in cases))
    return meta, root, [(n, kind) for n, (_, kind) in enumerate(cases, 1)]


DECODE_ONLY = {"corrupt_image", "too_large"}  # a stat check cannot see inside a file


@pytest.mark.parametrize("decode", [True, False])
def test_check_data_names_every_defect_with_its_line(world, tmp_path, capsys, decode):
    meta, root, cases = world
    args = ["check-data", "--meta", str(meta), "--root", str(root), "--out", str(tmp_path), "--workers", "1"]
    t0 = time.perf_counter()
    assert main(args + (["--decode"] if decode else [])) == 0
    assert time.perf_counter() - t0 < 30  # the bomb is refused from its header, never decoded
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "data_check.json").read_text())
    expected: dict[str, list[int]] = {}
    for n, kind in cases:
        if kind and (decode or kind not in DECODE_ONLY):
            expected.setdefault(kind, []).append(n)
    assert report["bad"] == {k: len(v) for k, v in sorted(expected.items())}
    assert report["ok"] == len(cases) - sum(len(v) for v in expected.values())
    for kind, lines in expected.items():
        assert [e["line"] for e in report["examples"][kind]] == lines, kind
        assert all(e["file"] == str(meta) for e in report["examples"][kind])
        assert f"  {kind}: {len(lines)} (first at {meta}:{lines[0]})" in err
    kept = (tmp_path / "clean.jsonl").read_text().splitlines()
    good = [n for n, kind in cases if kind is None or (not decode and kind in DECODE_ONLY)]
    assert kept == [meta.read_text().splitlines()[n - 1] for n in good]
    if decode:
        assert "10000000000 pixels" in report["examples"]["too_large"][0]["reason"]


def test_training_loader_never_crashes_and_counts_replacements(world, tmp_path, caplog):
    meta, root, cases = world
    caplog.set_level(logging.WARNING, logger="declip.data.datasets")
    cfg = load_config(TINY, overrides(tmp_path))
    ds = TrainDataset(cfg, meta, root, seed=0)
    assert len(ds) == len(cases)
    keys = [(n - 1, draw) for draw, (n, _) in enumerate(cases)]
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=keys, num_workers=0, collate_fn=collate)
    batches = list(loader)
    assert time.perf_counter() - t0 < 30
    replaced = torch.cat([b["replaced"] for b in batches]).tolist()
    assert replaced == [int(kind is not None) for _, kind in cases]  # defects replaced, converted images kept
    assert all(torch.isfinite(b["images"].float()).all() for b in batches)
    assert ds.failures >= sum(replaced)  # a replacement may itself be bad: every failed attempt is counted
    first = next(n for n, kind in cases if kind)
    assert f"bad sample replaced: {meta}:{first}: image {root / 'empty.jpg'} is empty" in caplog.text


def test_a_1mb_caption_is_truncated_in_milliseconds():
    tok = Tokenizer(None, 32)
    rng = random.Random(1)
    hostile = {
        "one 1 MB word": "".join(rng.choice(string.ascii_lowercase) for _ in range(BIG)),  # BPE is quadratic per word
        "printable noise": "".join(rng.choice(string.printable) for _ in range(BIG)),
        "control characters": "".join(chr(rng.randrange(32)) for _ in range(BIG)),
        "CJK": "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(BIG // 3)),
        "html entities": "&amp;lt;" * (BIG // 9),
    }
    for name, text in hostile.items():
        t0 = time.perf_counter()
        out = tok([text])[0]
        took = time.perf_counter() - t0
        assert took < 0.5, f"{name}: {took:.2f} s"
        assert out[0] == SOT_ID and (out == EOT_ID).sum() == 1 and out.shape == (32,), name
    words = " ".join(["a photo of a dog"] * (BIG // 17))
    assert torch.equal(tok([words]), tok(["a photo of a dog " * 8]))  # the context holds the same first tokens


@pytest.fixture(scope="module")
def nltk_dir(tmp_path_factory):
    from declip.text.nltk_setup import setup_nltk

    folder = tmp_path_factory.mktemp("rel_nltk") / "nltk_data"
    try:
        setup_nltk(folder, [], allow_download=False, search_nltk_path=False)
    except InputError as e:
        pytest.skip(f"NLTK corpora cannot be prepared offline here: {e}")
    return folder


def test_eda_of_a_1mb_caption_is_bounded(nltk_dir):
    from declip.text.eda import EDA
    from declip.text.tokenizer import MAX_TEXT_CHARS

    eda = EDA(nltk_dir)
    eda("warm up the corpora", random.Random(0))
    rng = random.Random(2)
    nonwords = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(10)) for _ in range(BIG // 11))
    for seed in range(3):  # synonym replacement (a lookup per distinct word), swap and deletion
        t0 = time.perf_counter()
        out = eda(nonwords, random.Random(seed))
        assert time.perf_counter() - t0 < 0.5 and len(out) <= MAX_TEXT_CHARS
