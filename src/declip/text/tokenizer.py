"""CLIP's byte-level BPE with DeCLIP's special ids, and BERT-style MLM masking.

BPE merges and text cleaning (ftfy, html-unescape twice, whitespace collapse,
lower-case) come from open_clip's `SimpleTokenizer`, whose regular ids equal
OpenAI CLIP's (0..49405). Only the special ids differ: open_clip puts its own
SOT/EOT at 49406/49407, DeCLIP has `<|mask|>` 49406, `<|startoftext|>` 49407,
`<|endoftext|>` 49408 (vocabulary 49409). EOT is the highest id, so the text
tower pools at `argmax(tokens)`.

Two deliberate differences from open_clip's `__call__`:
- special-token text inside a caption ("<start_of_text>") is tokenised as
  plain text: open_clip would map it to its own special ids, which collide with
  DeCLIP's mask and SOT ids;
- the per-word BPE cache is reset past `_CACHE_LIMIT` words, so a DataLoader
  worker's memory stays bounded over 15M distinct captions;
- the work per caption is bounded: only the first `MAX_TEXT_CHARS` characters are
  read, a "word" is cut to `MAX_WORD_CHARS` (BPE is quadratic in word length: a
  30k-letter word took 15 s, a 1 MB one hours) and encoding stops once the context
  is full. Real captions tokenise exactly as before; a 1 MB caption takes
  milliseconds (tests/reliability).
"""

from __future__ import annotations

import functools
from pathlib import Path

import regex
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from declip.config import DataConfig
from declip.errors import InputError

MASK_ID = 49406
SOT_ID = 49407
EOT_ID = 49408
VOCAB_SIZE = 49409
PAD_ID = 0
CONTEXT_LENGTH = 77

# OpenAI CLIP's word pattern without the special-token alternatives.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CACHE_LIMIT = 200_000
MAX_TEXT_CHARS = 1 << 16  # far more than 77 tokens of any real caption
MAX_WORD_CHARS = 256


@functools.lru_cache(maxsize=4)
def _load_bpe(path: str) -> SimpleTokenizer:
    """One SimpleTokenizer per vocab file and process (reading the merges takes ~0.3 s)."""
    if not Path(path).is_file():
        raise InputError(f"BPE vocab not found: {path}")
    try:
        bpe = SimpleTokenizer(bpe_path=path)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a gzipped CLIP BPE merges file ({e})") from None
    regular = len(bpe.encoder) - len(bpe.all_special_ids)
    if regular != MASK_ID:
        raise InputError(f"{path}: gives {regular} regular BPE ids, DeCLIP's ids need {MASK_ID} (48894 merges)")
    bpe.pat = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
    return bpe


class Tokenizer:
    """`tokenizer(texts) -> LongTensor (N, context_length)`: [SOT] + BPE ids + [EOT], zero-padded.

    A caption longer than the context keeps SOT, its first `context_length - 2`
    tokens and EOT. The object holds only the path, so it pickles cheaply into
    DataLoader workers; the BPE tables load once per process.
    """

    def __init__(self, bpe_path: str | None = None, context_length: int = CONTEXT_LENGTH):
        if context_length < 3:
            raise ValueError(f"context_length must leave room for SOT, a token and EOT, got {context_length}")
        self.bpe_path = str(bpe_path) if bpe_path is not None else default_bpe()
        self.context_length = context_length
        _load_bpe(self.bpe_path)  # fail here, with the file's name, not in a worker

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Regular BPE ids of one caption (no SOT/EOT); at least the first `limit` when given.

        open_clip's `SimpleTokenizer.encode`, bounded (see the module doc)."""
        bpe = _load_bpe(self.bpe_path)
        if len(bpe.cache) > _CACHE_LIMIT:
            bpe.cache.clear()
        ids: list[int] = []
        for word in bpe.pat.finditer(bpe.clean_fn(text[:MAX_TEXT_CHARS])):
            token = "".join(bpe.byte_encoder[b] for b in word.group()[:MAX_WORD_CHARS].encode("utf-8"))
            ids.extend(bpe.encoder[t] for t in bpe.bpe(token).split(" "))
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        keep = self.context_length - 2
        out = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text, keep)[:keep], EOT_ID]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def tokenize(texts: list[str] | str, context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Tokenise with the vocab open_clip ships (identical to the seed's `bpe_simple_vocab_16e6.txt.gz`)."""
    return Tokenizer(None, context_length)(texts)


def resolve_bpe_path(cfg: DataConfig) -> str | None:
    """The dataset's BPE vocab when the file exists, else None (the packaged copy)."""
    path = cfg.path("bpe_vocab")
    return str(path) if path.is_file() else None


def mask_tokens(
    tokens: torch.Tensor,
    generator: torch.Generator,
    probability: float = 0.15,
    vocab_size: int = VOCAB_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style MLM masking of tokenised captions (..., L) -> (masked, labels).

    Real tokens are the positions strictly between SOT (position 0) and the EOT
    (the argmax); SOT, EOT and padding are never chosen. Each real token is
    chosen with `probability`; of the chosen, 80% become MASK_ID, 10% a random
    regular id and 10% stay. Random ids are uniform over [1, vocab_size - 3),
    the regular ids without 0, which doubles as padding (the reference draws
    from the whole vocabulary, specials included). `labels` holds the original
    id at chosen positions and -100 elsewhere; when nothing is chosen (short
    captions often) all labels are -100 and the MLM term sees an empty set.
    All randomness comes from `generator`, so a sample's mask is a function of
    its seed.
    """
    if not 0 < probability < 1:
        raise ValueError(f"MLM probability must be in (0, 1), got {probability}")
    shape, dev = tokens.shape, generator.device
    position = torch.arange(shape[-1], device=tokens.device)
    eot = tokens.argmax(dim=-1, keepdim=True)
    real = (position > 0) & (position < eot)

    chosen_draw = torch.rand(shape, generator=generator, device=dev).to(tokens.device)
    action_draw = torch.rand(shape, generator=generator, device=dev).to(tokens.device)
    random_ids = torch.randint(1, vocab_size - 3, shape, generator=generator, device=dev).to(tokens.device)

    chosen = real & (chosen_draw < probability)
    masked = tokens.clone()
    masked[chosen & (action_draw < 0.8)] = MASK_ID
    to_random = chosen & (action_draw >= 0.8) & (action_draw < 0.9)
    masked[to_random] = random_ids[to_random]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return masked, labels
