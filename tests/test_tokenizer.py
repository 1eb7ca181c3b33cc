"""Tokenizer: DeCLIP's special ids on top of CLIP's BPE, truncation, padding, MLM masking."""

import pickle
import random
import shutil

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from declip.config import DataConfig
from declip.errors import InputError
from declip.text.tokenizer import (
    EOT_ID,
    MASK_ID,
    PAD_ID,
    SOT_ID,
    VOCAB_SIZE,
    Tokenizer,
    mask_tokens,
    resolve_bpe_path,
    tokenize,
)


def varied_captions(n: int = 240) -> list[str]:
    """Captions assembled from pieces that exercise cleaning and BPE: accents, CJK, emoji, entities, digits."""
    rng = random.Random(0)
    pieces = [
        "A photo of a dog", "Café au lait", "naïve résumé", "Ångström and Øresund", "東京タワーの夜景",
        "北京 天安门", "서울의 밤", "Москва зимой", "🐶🐱 cute pets 🎉", "emoji 👍🏽 thumbs",
        "Tom &amp; Jerry", "it&#39;s raining", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; double-escaped",
        "Price: $1,299.99!!!", "3.14159 and 2e-10", "2021-07-04 12:30", "ISO-8859-1 vs UTF-8",
        "MiXeD CaSe WoRdS", "UPPERCASE SHOUTING", "don't won't they're I'm we'll she'd",
        "   extra    spaces\tand\nnewlines  ", "hyphen-ated well-known state-of-the-art",
        "punctuation... ?!?! ;-) :)", "quotes \u201csmart\u201d and \u2018single\u2019", "mojibake cafÃ©",
        "url http://example.com/a?b=c&d=e", "#hashtag @mention", "fiancée's crème brûlée",
        "ß straße", "Ελληνικά γράμματα", "עברית", "العربية", "हिन्दी", "tab\tseparated",
        "a", "", "IMG_20190812_123456.jpg", "(parenthesised) [bracketed] {braced}", "1000000000",
    ]  # fmt: skip
    captions = list(pieces)
    while len(captions) < n:
        k = rng.randint(1, 6)
        captions.append(" ".join(rng.choice(pieces) for _ in range(k)))
    # long captions that must be truncated
    captions += [" ".join(rng.choice(pieces) for _ in range(40)) for _ in range(10)]
    return captions


def test_special_ids():
    assert (MASK_ID, SOT_ID, EOT_ID, VOCAB_SIZE, PAD_ID) == (49406, 49407, 49408, 49409, 0)
    assert EOT_ID == VOCAB_SIZE - 1  # the text tower pools at argmax


def test_layout_and_padding():
    tok = Tokenizer(context_length=12)
    ids = tok.encode("a photo of a cat")
    out = tok(["a photo of a cat", ""])
    assert out.shape == (2, 12) and out.dtype == torch.long
    n = len(ids)
    assert out[0, 0] == SOT_ID and out[0, n + 1] == EOT_ID
    assert out[0, 1 : n + 1].tolist() == ids
    assert (out[0, n + 2 :] == PAD_ID).all()
    assert out[1, :2].tolist() == [SOT_ID, EOT_ID] and (out[1, 2:] == PAD_ID).all()
    assert max(ids) < MASK_ID


def test_truncation_keeps_sot_first_tokens_and_eot():
    tok = Tokenizer(context_length=8)
    text = "one two three four five six seven eight nine ten"
    ids = tok.encode(text)
    assert len(ids) > 6
    row = tok([text])[0]
    assert row.tolist() == [SOT_ID, *ids[:6], EOT_ID]
    assert tokenize([text], context_length=77)[0, : len(ids) + 2].tolist() == [SOT_ID, *ids, EOT_ID]


def test_regular_ids_equal_open_clip():
    captions = varied_captions()
    assert len(captions) >= 200
    ours = tokenize(captions)
    theirs = SimpleTokenizer()(captions, context_length=77)
    oc_sot, oc_eot = 49406, 49407
    expected = theirs.clone()
    expected[theirs == oc_sot] = SOT_ID
    expected[theirs == oc_eot] = EOT_ID
    assert torch.equal(ours, expected)
    truncated = (ours[:, -1] == EOT_ID).sum().item()
    assert truncated >= 10  # the long captions really were cut


def test_special_text_in_caption_is_plain_text():
    # open_clip would map these to its special ids, which collide with DeCLIP's MASK and SOT.
    row = tokenize(["a <start_of_text> b <end_of_text> c"])[0]
    inner = row[1 : row.argmax()]
    assert (inner < MASK_ID).all() and row.argmax() > 8


def test_custom_vocab_path(tmp_path):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy(default_bpe(), path)
    texts = varied_captions(50)
    assert torch.equal(Tokenizer(str(path))(texts), tokenize(texts))
    assert resolve_bpe_path(DataConfig(dataset_dir=str(tmp_path))) == str(path)
    assert resolve_bpe_path(DataConfig(dataset_dir=str(tmp_path / "missing"))) is None


def test_bad_vocab_is_named(tmp_path):
    with pytest.raises(InputError, match="nowhere.txt.gz"):
        Tokenizer(str(tmp_path / "nowhere.txt.gz"))
    bad = tmp_path / "bad.txt.gz"
    bad.write_text("not gzip")
    with pytest.raises(InputError, match="bad.txt.gz"):
        Tokenizer(str(bad))


def test_pickles_for_dataloader_workers():
    tok = Tokenizer(context_length=20)
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 500
    assert torch.equal(clone(["a dog on a beach"]), tok(["a dog on a beach"]))


def synthetic_batch(n: int, length: int = 77, seed: int = 0) -> torch.Tensor:
    """Token rows of random lengths: SOT, regular ids (0 included: it is a real token inside a caption), EOT, pad."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, length, dtype=torch.long)
    lengths = torch.randint(0, length - 1, (n,), generator=g)
    for i, k in enumerate(lengths.tolist()):
        out[i, 0] = SOT_ID
        out[i, 1 : k + 1] = torch.randint(0, MASK_ID, (k,), generator=g)
        out[i, k + 1] = EOT_ID
    return out


def test_mask_statistics():
    tokens = synthetic_batch(4000)
    masked, labels = mask_tokens(tokens, torch.Generator().manual_seed(1), probability=0.15)
    position = torch.arange(tokens.shape[1])
    real = (position > 0) & (position < tokens.argmax(-1, keepdim=True))
    chosen = labels != -100
    assert not (chosen & ~real).any()  # never SOT, EOT or padding
    assert torch.equal(masked[~real], tokens[~real])
    assert torch.equal(masked[~chosen], tokens[~chosen])
    assert torch.equal(labels[chosen], tokens[chosen])
    n_real, n_chosen = real.sum().item(), chosen.sum().item()
    assert n_real > 100_000
    assert abs(n_chosen / n_real - 0.15) < 0.005
    to_mask = (masked == MASK_ID) & chosen
    kept = (masked == tokens) & chosen
    to_random = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum().item() / n_chosen - 0.8) < 0.015
    assert abs(kept.sum().item() / n_chosen - 0.1) < 0.01
    assert abs(to_random.sum().item() / n_chosen - 0.1) < 0.01
    random_ids = masked[to_random]
    assert random_ids.min() >= 1 and random_ids.max() < MASK_ID  # regular ids, never pad or specials


def test_mask_is_deterministic_per_generator():
    tokens = synthetic_batch(64, seed=3)
    a = mask_tokens(tokens, torch.Generator().manual_seed(7))
    b = mask_tokens(tokens, torch.Generator().manual_seed(7))
    c = mask_tokens(tokens, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_single_row_and_empty_caption():
    row = tokenize(["a long caption " * 10])[0]
    masked, labels = mask_tokens(row, torch.Generator().manual_seed(0), probability=0.5)
    assert masked.shape == labels.shape == row.shape
    assert (labels != -100).any() and labels[0] == -100 and labels[row.argmax()] == -100
    empty = tokenize([""])
    for seed in range(20):
        masked, labels = mask_tokens(empty, torch.Generator().manual_seed(seed), probability=0.9)
        assert (labels == -100).all() and torch.equal(masked, empty)


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_mask_probability_is_checked(probability):
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(synthetic_batch(2), torch.Generator(), probability=probability)
