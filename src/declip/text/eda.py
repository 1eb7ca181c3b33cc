"""EDA text augmentation for DeCLIP's second text view (reference §5).

Per caption one of three operations, chosen uniformly: synonym replacement (n = 1), random swap (n = 1),
random deletion (p = 0.1). All randomness comes from the caller's `random.Random`, which the dataset seeds
per sample, so an augmentation is reproducible and Python's global RNG is never touched (textaugment's
`EDA()` reseeded it on construction). No cleaning is applied before the operations, as in the reference.

Where we differ from textaugment's EDA, which the reference used:
- candidate words and synonyms are sorted before a random choice; set order depends on PYTHONHASHSEED,
  so textaugment chose differently in every process for the same seed;
- the stopword test and the "not the word itself" test use the lower-cased word: the tokenizer
  lower-cases, so "The" is a stopword and "dog" is no synonym of "Dog";
- synonyms are whitespace-normalised and dropped when nothing is left after cleaning ("9-11");
- swap always exchanges two distinct positions (textaugment gave up after three equal draws);
- deletion leaves a one-word caption as it is (textaugment returned a list).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path

from declip.text.nltk_setup import check_corpora, english_stopwords, open_wordnet
from declip.text.tokenizer import MAX_TEXT_CHARS

DELETE_PROB = 0.1
SYNONYM_CACHE_SIZE = 1 << 16
_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz ")


def clean_synonym(lemma_name: str) -> str:
    """A WordNet lemma name as caption text: lower-case, '_' and '-' as spaces, only a-z and single spaces."""
    text = lemma_name.replace("_", " ").replace("-", " ").lower()
    return " ".join("".join(c for c in text if c in _KEEP).split())


def synonyms_from_lemmas(word: str, lemma_names: Iterable[str]) -> tuple[str, ...]:
    """Sorted distinct cleaned lemma names, without `word` itself and without empty ones."""
    return tuple(sorted({clean_synonym(n) for n in lemma_names} - {word.lower(), ""}))


def synonym_replacement(
    caption: str, rng: random.Random, synonyms: Callable[[str], Sequence[str]], stop_words: Container[str]
) -> str:
    """Replace every occurrence of one random non-stopword that has synonyms by one random synonym of it."""
    words = caption.split()
    candidates = sorted({w for w in words if w.lower() not in stop_words})
    rng.shuffle(candidates)
    for word in candidates:
        options = synonyms(word)
        if options:
            new = rng.choice(options)
            return " ".join(new if w == word else w for w in words)
    return " ".join(words)


def random_swap(caption: str, rng: random.Random) -> str:
    """Swap the words at two distinct random positions."""
    words = caption.split()
    if len(words) >= 2:
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_deletion(caption: str, rng: random.Random, p: float = DELETE_PROB) -> str:
    """Drop each word with probability `p`; when all would go, keep one random word."""
    words = caption.split()
    if len(words) < 2:
        return " ".join(words)
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept else rng.choice(words)


class EDA:
    """`EDA(nltk_dir)(caption, rng) -> caption`: one random EDA operation, as in the reference.

    The corpora are checked at construction (a clear error before any worker starts) but loaded on first
    use in each process: WordNet keeps open files whose offsets a forked worker would share with its parent.
    """

    def __init__(self, nltk_dir: str | Path | None = None, p_delete: float = DELETE_PROB):
        self.nltk_dir = nltk_dir
        self.p_delete = p_delete
        self._pid: int | None = None
        check_corpora(nltk_dir)

    def __getstate__(self) -> dict:
        # Workers started by spawn get the settings and load the corpora themselves.
        return {"nltk_dir": self.nltk_dir, "p_delete": self.p_delete, "_pid": None}

    def _load(self) -> None:
        if self._pid != os.getpid():
            self._wordnet = open_wordnet(self.nltk_dir)
            self._stop_words = english_stopwords(self.nltk_dir)
            self._synonyms = functools.lru_cache(maxsize=SYNONYM_CACHE_SIZE)(self._lookup)
            self._pid = os.getpid()

    def _lookup(self, word: str) -> tuple[str, ...]:
        return synonyms_from_lemmas(word, (lemma.name() for s in self._wordnet.synsets(word) for lemma in s.lemmas()))

    def synonyms(self, word: str) -> tuple[str, ...]:
        """The sorted synonyms synonym replacement chooses from for `word` (cached)."""
        self._load()
        return self._synonyms(word)

    def __call__(self, caption: str, rng: random.Random) -> str:
        self._load()
        # The tokenizer reads no further; a hostile 1 MB caption must not cost a worker a synonym lookup per word.
        caption = caption[:MAX_TEXT_CHARS]
        op = rng.randrange(3)
        if op == 0:
            return synonym_replacement(caption, rng, self._synonyms, self._stop_words)
        if op == 1:
            return random_swap(caption, rng)
        return random_deletion(caption, rng, self.p_delete)
