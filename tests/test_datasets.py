import io
import json
import logging
import random

import nltk
import numpy as np
import pytest
import torch
from PIL import Image

from declip.config import load_config
from declip.data.datasets import (
    MAX_ATTEMPTS,
    TrainDataset,
    ValDataset,
    collate,
    replacement_index,
    sample_seeds,
)
from declip.errors import InputError
from declip.text.tokenizer import Tokenizer

CAPTIONS = [
    "a brown dog runs on the green grass",
    "red car parked near the old barn",
    "sunset over a quiet lake with mountains",
    "two children playing football in a park",
    "a bowl of fresh fruit on a wooden table",
    "snow covered trees along a mountain road",
]
BAD = {6: "missing image", 7: "corrupt image", 8: "bad JSON", 9: "empty caption", 10: "path escaping the root"}


def jpeg(seed, w=96, h=72):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 2 + rng.integers(0, 60), y * 3 + rng.integers(0, 60), (x + y) + rng.integers(0, 60)], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dataset")
    root = d / "images"
    root.mkdir()
    lines = []
    for i, caption in enumerate(CAPTIONS):
        (root / f"{i}.jpg").write_bytes(jpeg(i))
        lines.append(json.dumps({"caption": [caption] if i % 2 else caption, "filename": f"{i}.jpg", "url": "u"}))
    (root / "corrupt.jpg").write_bytes(jpeg(99)[:200])
    lines += [
        json.dumps({"caption": "a missing photo", "filename": "gone.jpg"}),
        json.dumps({"caption": "a corrupt photo", "filename": "corrupt.jpg"}),
        '{"caption": "cut',
        json.dumps({"caption": " ", "filename": "0.jpg"}),
        # A readable image outside the root: only the path check stops it.
        json.dumps({"caption": "escaped", "filename": "../outside.jpg"}),
    ]
    (d / "outside.jpg").write_bytes(jpeg(98))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


def tiny(data, *overrides):
    return load_config("config/declip_tiny.yaml", [f"data.dataset_dir={data}", "data.eda=false", *overrides])


@pytest.fixture(scope="module")
def ds(data):
    return TrainDataset(tiny(data), data / "train.jsonl", data / "images", seed=3)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(None, 32)


def test_item_keys_shapes_and_text(ds, tok):
    item = ds[(1, 0)]
    assert set(item) == {"images", "text", "mlm_labels", "text_eda", "replaced", "index"}
    assert item["images"].shape == (2, 3, 64, 64) and item["images"].dtype == torch.float32
    plain = tok([CAPTIONS[1]])[0]
    assert torch.equal(item["text_eda"], plain)  # eda off: the second view is the plain caption
    labels, text = item["mlm_labels"], item["text"]
    chosen = labels != -100
    assert torch.equal(labels[chosen], plain[chosen]) and torch.equal(text[~chosen], plain[~chosen])
    assert item["replaced"].item() == 0 and item["index"].item() == 1


def test_mlm_masks_about_15_percent(ds, tok):
    chosen = real = 0
    for draw in range(60):
        item = ds[(draw % 6, draw)]
        plain = tok([CAPTIONS[draw % 6]])[0]
        real += int((plain > 0).sum()) - 2
        chosen += int((item["mlm_labels"] != -100).sum())
    assert 0.08 < chosen / real < 0.22


def test_deterministic_by_index_and_draw(ds, data):
    a, b = ds[(2, 17)], ds[(2, 17)]
    fresh = TrainDataset(tiny(data), data / "train.jsonl", data / "images", seed=3)[(2, 17)]
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], fresh[key])
    other = ds[(2, 18)]
    assert not torch.equal(a["images"], other["images"])
    state = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    ds[(2, 19)]
    assert torch.equal(torch.random.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1]) and random.getstate() == state[2]
    reseeded = TrainDataset(tiny(data), data / "train.jsonl", data / "images", seed=4)[(2, 17)]
    assert not torch.equal(a["images"], reseeded["images"])


def test_seed_streams_are_independent():
    assert len(set(sample_seeds(0, 5))) == 3
    assert sample_seeds(0, 5) != sample_seeds(0, 6) != sample_seeds(1, 5)
    picks = [replacement_index(0, 7, 0, k, 10) for k in range(1, 200)]
    assert set(picks) == set(range(10))


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_sample_replaced_deterministically(ds, bad, caplog):
    draw = 5
    expected, attempt = bad, 0
    while expected in BAD:  # the first good index of the replacement chain
        attempt += 1
        expected = replacement_index(3, bad, draw, attempt, len(ds))
    with caplog.at_level(logging.WARNING, logger="declip.data.datasets"):
        item = ds[(bad, draw)]
    good = ds[(expected, draw)]
    assert item["replaced"].item() == 1 and item["index"].item() == bad
    for key in ("images", "text", "mlm_labels", "text_eda"):
        assert torch.equal(item[key], good[key])
    if ds.failures <= 10:
        assert f"train.jsonl:{bad + 1}:" in caplog.text


def test_all_bad_raises_naming_the_file(tmp_path):
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"caption": "x", "filename": "nope.jpg"}) + "\n")
    ds = TrainDataset(tiny(tmp_path), meta, tmp_path, seed=0)
    with pytest.raises(InputError, match=rf"no loadable sample .*{MAX_ATTEMPTS} attempts.*m.jsonl:1: image .*nope.jpg"):
        ds[(0, 0)]
    with pytest.raises(InputError, match="manifest not found"):
        TrainDataset(tiny(tmp_path), tmp_path / "missing.jsonl", tmp_path, seed=0)


def test_collate_and_dataloader_workers(ds):
    keys = [(i % 6, i) for i in range(8)]
    batch = collate([ds[k] for k in keys])
    assert batch["images"].shape == (8, 2, 3, 64, 64)
    assert batch["text"].shape == batch["mlm_labels"].shape == batch["text_eda"].shape == (8, 32)
    assert batch["replaced"].shape == batch["index"].shape == (8,)
    assert batch["text"].dtype == batch["replaced"].dtype == torch.long
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=keys, num_workers=2, collate_fn=collate)
    parts = list(loader)  # forked workers reopen the manifest and produce the same samples
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])


def test_clip_mode_items(data, tok):
    cfg = tiny(
        data,
        "loss.image_views=1",
        "loss.text_views=1",
        "loss.mlm_weight=0",
        "loss.simsiam_weight=0",
        "loss.nns_weight=0",
    )
    item = TrainDataset(cfg, data / "train.jsonl", data / "images", seed=0)[(0, 0)]
    assert set(item) == {"images", "text", "replaced", "index"}
    assert item["images"].shape == (1, 3, 64, 64) and torch.equal(item["text"], tok([CAPTIONS[0]])[0])


@pytest.fixture(scope="module")
def nltk_dir(tmp_path_factory):
    from declip.text.nltk_setup import setup_nltk

    tmp = tmp_path_factory.mktemp("ds_nltk")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp)
            mp.setattr(nltk.data, "path", list(nltk.data.path))
            setup_nltk(tmp / "nltk_data", [], allow_download=False, search_nltk_path=False)
    except InputError as e:
        pytest.skip(f"NLTK corpora cannot be prepared offline here: {e}")
    return tmp / "nltk_data"


def test_eda_view(data, nltk_dir, tok):
    cfg = load_config("config/declip_tiny.yaml", [f"data.dataset_dir={data}", f"data.nltk_dir={nltk_dir}"])
    ds = TrainDataset(cfg, data / "train.jsonl", data / "images", seed=0)
    items = [ds[(i % 6, i)] for i in range(24)]
    changed = [not torch.equal(it["text_eda"], tok([CAPTIONS[i % 6]])[0]) for i, it in enumerate(items)]
    assert sum(changed) >= 12  # swap, deletion and most synonym replacements change these captions
    again = ds[(5, 5)]
    assert torch.equal(again["text_eda"], items[5]["text_eda"])


def test_val_dataset(tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    rows = [(f"ILSVRC2012_val_{i:08d}.JPEG", i % 3, ["cat", "dog", "hen"][i % 3]) for i in range(4)]
    for i, (f, _, _) in enumerate(rows):
        (root / f).write_bytes(jpeg(i, 80, 100))
    meta = tmp_path / "val_official.json"
    meta.write_text("\n".join(json.dumps({"filename": f, "label": y, "label_name": n}) for f, y, n in rows) + "\n")
    val = ValDataset(meta, root, 64)
    assert len(val) == 4
    image, label = val[3]
    assert image.shape == (3, 64, 64) and label == 0
    assert torch.equal(val[3][0], image)
    (root / rows[2][0]).unlink()
    with pytest.raises(InputError, match=r"val_official.json: val image .*ILSVRC2012_val_00000002.JPEG"):
        val[2]
