"""The demo world: real formats, exact planted defects, byte-for-byte determinism, learnable classes."""

from __future__ import annotations

import colorsys
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from declip.config import load_config
from declip.data import demo
from declip.data.check import check_data
from declip.data.manifest import class_names as read_class_names
from declip.errors import InputError
from declip.text.tokenizer import tokenize

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_train": 48, "n_val_per_class": 3, "progress": False}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "ds"
    return out, demo.make_demo_data(out, seed=7, **SMALL)


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, small):
    out, _ = small
    again = demo.make_demo_data(tmp_path / "a", seed=7, **SMALL)
    other = demo.make_demo_data(tmp_path / "b", seed=8, **SMALL)
    same, first, second = _files(tmp_path / "a"), _files(out), _files(tmp_path / "b")
    assert same == first  # every file, manifests and images alike
    assert again["planted_defects"] == small[1]["planted_defects"]
    assert other["seed"] == 8
    for name in (demo.TRAIN_META, demo.VAL_META, demo.SUMMARY, f"{demo.VAL_ROOT}/ILSVRC2012_val_00000001.JPEG"):
        assert first[name] != second[name], name
    # training file names are seed-specific hashes (val names are ImageNet's, the same for every seed)
    train_a = {k for k in first if k.startswith(demo.TRAIN_ROOT + "/")}
    train_b = {k for k in second if k.startswith(demo.TRAIN_ROOT + "/")}
    assert len(train_a) == len(train_b) == 48 + 3 and not train_a & train_b


def test_train_manifest_format(small):
    out, summary = small
    lines = _lines(out / demo.TRAIN_META)
    bad_json = {d["line"] for d in summary["planted_defects"] if d["kind"] == "invalid_json"}
    assert len(lines) == summary["train"]["records"] == 48 + len(summary["planted_defects"])
    as_list = 0
    for n, line in enumerate(lines, start=1):
        if n in bad_json:
            continue
        rec = json.loads(line)
        assert list(rec) == ["caption", "filename", "url"], n
        if isinstance(rec["caption"], list):
            assert len(rec["caption"]) == 1 and isinstance(rec["caption"][0], str), n
            as_list += 1
        else:
            assert isinstance(rec["caption"], str), n
        assert re.fullmatch(r"http://demo\.invalid/photos/[0-9a-z]+\.jpg", rec["url"]), rec["url"]
        assert rec["filename"] == "../outside.jpg" or re.fullmatch(r"\d\d/[0-9a-f]{32}\.jpg", rec["filename"])
    assert 0 < as_list < len(lines) // 2  # some one-element lists, as in the real manifest
    shards = [p.name for p in (out / demo.TRAIN_ROOT).iterdir()]
    assert shards == ["00"] and all(p.is_dir() for p in (out / demo.TRAIN_ROOT).iterdir())


def test_val_manifest_format_and_images(small):
    out, summary = small
    recs = [json.loads(line) for line in _lines(out / demo.VAL_META)]
    names = demo.class_names()
    assert summary["classes"] == names and len(names) == len(set(names)) == 35
    assert len(recs) == summary["val"]["images"] == 35 * 3
    assert [r["filename"] for r in recs] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(recs) + 1)]
    labels = [r["label"] for r in recs]
    assert sorted(set(labels)) == list(range(35)) and np.bincount(labels).tolist() == [3] * 35
    assert labels != sorted(labels)  # interleaved like ImageNet's val folder
    assert all(r["label_name"] == names[r["label"]] and list(r) == ["filename", "label", "label_name"] for r in recs)
    assert read_class_names(out / demo.VAL_META) == names  # the reader zero-shot eval uses agrees
    files = sorted((out / demo.VAL_ROOT).iterdir())
    assert [p.name for p in files] == [r["filename"] for r in recs]  # flat, nothing else
    for p in files[:20]:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (demo.IMAGE_SIZE, demo.IMAGE_SIZE))


def _object_hue(path: Path) -> float:
    """Median hue (degrees) of the strongly saturated pixels: backgrounds are near-neutral, objects are not."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in rgb])
    strong = hsv[(hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.5)]
    assert len(strong) > 0.03 * len(hsv), path  # the object covers a real part of the image
    # circular median around the expected hue is not needed: red is the only hue near 0/360, so shift it
    return float(np.median((strong[:, 0] * 360.0 + 30.0) % 360.0 - 30.0))


def test_val_images_show_their_class_colour(small):
    out, _ = small
    for rec in [json.loads(line) for line in _lines(out / demo.VAL_META)][:35]:
        colour = rec["label_name"].split()[0]
        hue = _object_hue(out / demo.VAL_ROOT / rec["filename"])
        assert abs(hue - demo.COLOURS[colour][0]) < 15, (rec, hue)


def test_planted_defects_are_exactly_the_listed_ones(small):
    out, summary = small
    root = out / demo.TRAIN_ROOT
    found = []
    for n, line in enumerate(_lines(out / demo.TRAIN_META), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            found.append({"line": n, "kind": "invalid_json"})
            continue
        caption = rec["caption"][0] if isinstance(rec["caption"], list) else rec["caption"]
        path = root / rec["filename"]
        if not path.resolve().is_relative_to(root.resolve()):
            assert path.resolve() == (out / demo.ESCAPE_TARGET).resolve() and path.stat().st_size > 0
            found.append({"line": n, "kind": "unsafe_path"})
        elif not path.exists():
            found.append({"line": n, "kind": "missing_image"})
        elif path.stat().st_size == 0:
            found.append({"line": n, "kind": "empty_image"})
        else:
            try:
                with Image.open(path) as im:
                    im.load()
            except OSError:
                found.append({"line": n, "kind": "corrupt_image"})
                continue
            if not caption.strip():
                found.append({"line": n, "kind": "empty_caption"})
    assert found == summary["planted_defects"]
    kinds = {"missing_image", "corrupt_image", "empty_image", "empty_caption", "unsafe_path", "invalid_json"}
    assert sorted(d["kind"] for d in found) == sorted(kinds)


def test_check_data_finds_exactly_the_planted_defects(small, tmp_path):
    out, summary = small
    report = check_data(out / demo.TRAIN_META, out / demo.TRAIN_ROOT, tmp_path / "check", decode=True, workers=1)
    planted = summary["planted_defects"]
    assert report["total"] == summary["train"]["records"]
    assert report["ok"] == summary["train"]["good_records"] == 48
    assert report["bad"] == {d["kind"]: 1 for d in planted}
    assert {kind: [ex["line"] for ex in found] for kind, found in report["examples"].items()} == {
        d["kind"]: [d["line"]] for d in planted
    }
    good = [
        line for n, line in enumerate(_lines(out / demo.TRAIN_META), start=1) if n not in {d["line"] for d in planted}
    ]
    assert _lines(tmp_path / "check" / "clean.jsonl") == good


def test_captions_name_the_class_concepts():
    rng = np.random.default_rng(0)
    names, hits, synonyms, n_class_scenes, texts = set(demo.class_names()), 0, 0, 0, []
    for _ in range(3000):
        shapes = demo.train_scene(rng)
        text = demo.caption(rng, shapes, ["a plain grey background"]).lower()
        texts.append(text)
        s = shapes[0]
        if len(shapes) == 1 and f"{s.colour} {s.kind}" in names:
            n_class_scenes += 1
            hits += f"{s.colour} {s.kind}" in text
            synonyms += any(w in text for w in demo.COLOURS[s.colour][1] + demo.SHAPES[s.kind])
    # the zero-shot prompt "a photo of a {label_name}." must be what the captions say, often
    assert n_class_scenes > 1500
    assert 0.3 < hits / n_class_scenes < 0.7
    assert 0.3 < synonyms / n_class_scenes < 0.8  # and synonyms for EDA and MLM to work on
    # no caption is cut by the tiny config's context (SOT + tokens + EOT)
    context = load_config(REPO / "config" / "declip_tiny.yaml").model.context_length
    longest = (tokenize(texts, context_length=77) != 0).sum(1).max().item()
    assert 12 < longest <= context


def test_second_call_skips_and_other_settings_replace(tmp_path):
    out = tmp_path / "ds"
    first = demo.make_demo_data(out, seed=1, **SMALL)
    marker = out / demo.VAL_ROOT / "ILSVRC2012_val_00000001.JPEG"
    stamp = marker.stat().st_mtime_ns
    assert demo.make_demo_data(out, seed=1, **SMALL) == first
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten

    (out / demo.TRAIN_META).write_text("truncated\n")  # a damaged dataset is regenerated, not trusted
    assert demo.make_demo_data(out, seed=1, **SMALL) == first
    assert len(_lines(out / demo.TRAIN_META)) == first["train"]["records"]

    second = demo.make_demo_data(out, seed=2, **SMALL)
    assert second["seed"] == 2 and json.loads((out / demo.SUMMARY).read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .tmp or .old left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="mine"):
        demo.make_demo_data(foreign, seed=1, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="seed"):
        demo.make_demo_data(tmp_path / "neg", seed=-1, **SMALL)


@pytest.mark.slow
def test_default_size_generates_quickly(tmp_path):
    # CPU time, not wall time: the budget is one core's work, whatever else the machine runs
    start = time.process_time()
    summary = demo.make_demo_data(tmp_path / "ds", progress=False)
    elapsed = time.process_time() - start
    assert elapsed < 40, f"default demo data took {elapsed:.1f} s of CPU"
    # one pass is 150 steps of the tiny config's batch 64; its 400 steps see each pair about 2.7 times
    assert summary["train"]["good_records"] == 9600 and summary["val"]["images"] == 525
    assert summary["train"]["shards"] == len(list((tmp_path / "ds" / demo.TRAIN_ROOT).iterdir())) == 5
    shutil.rmtree(tmp_path / "ds")  # 57 MB; pytest keeps the last runs' tmp folders
