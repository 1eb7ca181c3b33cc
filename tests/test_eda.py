"""EDA: each operation's contract, the uniform dispatch, determinism per seed, no global RNG use."""

import pickle
import random

import nltk
import pytest
from corpora import needs_debian_wordnet

from declip.errors import InputError
from declip.text.eda import (
    EDA,
    clean_synonym,
    random_deletion,
    random_swap,
    synonym_replacement,
    synonyms_from_lemmas,
)
from declip.text.nltk_setup import english_stopwords, open_wordnet, setup_nltk

pytestmark = needs_debian_wordnet

CAPTIONS = [
    "a brown dog runs on the green grass near the old barn",
    "The Dog chases the dog",
    "sunset",
    "photo of 9-11 memorial in New York City",
    "",
]


@pytest.fixture(scope="module")
def nltk_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eda_nltk")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setattr(nltk.data, "path", list(nltk.data.path))
        setup_nltk(tmp / "nltk_data", [], allow_download=False, search_nltk_path=False)
    return tmp / "nltk_data"


@pytest.fixture(scope="module")
def eda(nltk_dir):
    return EDA(nltk_dir)


@pytest.fixture(scope="module")
def wordnet_synonyms(nltk_dir):
    """Synonyms of a word read from WordNet directly, per reference §5, as a set."""
    wn = open_wordnet(nltk_dir)

    def synonyms(word):
        names = {clean_synonym(lemma.name()) for s in wn.synsets(word) for lemma in s.lemmas()}
        return names - {word.lower(), ""}

    return synonyms


def test_clean_synonym():
    assert clean_synonym("Canis_familiaris") == "canis familiaris"
    assert clean_synonym("dog-iron") == "dog iron"
    assert clean_synonym("St._John's_wort") == "st johns wort"
    assert clean_synonym("9-11") == ""
    assert synonyms_from_lemmas("Dog", ["dog", "hound", "Hound", "9-11", "domestic_dog"]) == ("domestic dog", "hound")


def test_synonym_replacement_replaces_one_word_everywhere(eda, nltk_dir, wordnet_synonyms):
    stop = english_stopwords(nltk_dir)
    caption = "a brown dog runs on the green grass near the dog barn"
    words = caption.split()
    replaced = set()
    for seed in range(40):
        out = synonym_replacement(caption, random.Random(seed), eda.synonyms, stop)
        matches = [
            (w, r)
            for w in set(words)
            if w.lower() not in stop
            for r in wordnet_synonyms(w)
            if out == " ".join(r if x == w else x for x in words)
        ]
        assert len(matches) == 1, (seed, out)
        replaced.add(matches[0][0])
    assert {"dog", "brown", "grass"} <= replaced  # the word is chosen at random, not always the same one


def test_synonym_replacement_skips_stopwords_and_words_without_synonyms(eda, nltk_dir):
    stop = english_stopwords(nltk_dir)
    for seed in range(20):
        out = synonym_replacement("the xqzvw of a dog", random.Random(seed), eda.synonyms, stop)
        assert out.startswith("the xqzvw of a ") and out != "the xqzvw of a dog"  # only 'dog' can change
    assert synonym_replacement("the xqzvw  of  it", random.Random(0), eda.synonyms, stop) == "the xqzvw of it"


def test_random_swap_keeps_the_words():
    words = ["one", "two", "three", "four", "five", "six"]
    pairs = set()
    for seed in range(200):
        out = random_swap(" ".join(words), random.Random(seed)).split()
        assert sorted(out) == sorted(words)
        diff = [i for i in range(len(words)) if out[i] != words[i]]
        assert len(diff) == 2 and out[diff[0]] == words[diff[1]]
        pairs.add(tuple(diff))
    assert len(pairs) == 15  # every pair of positions comes up
    assert random_swap("sunset", random.Random(0)) == "sunset"


def test_random_deletion_only_removes_and_never_empties():
    words = [f"w{i}" for i in range(10)]
    caption = " ".join(words)
    kept = 0
    for seed in range(2000):
        out = random_deletion(caption, random.Random(seed)).split()
        it = iter(words)
        assert out and all(w in it for w in out)  # a non-empty subsequence, order kept
        kept += len(out)
    assert abs(kept / 20000 - 0.9) < 0.01  # each word survives with probability 0.9 (sd of the mean 0.002)
    for seed in range(20):
        out = random_deletion(caption, random.Random(seed), p=1.0)
        assert out in words  # everything dropped: one random word comes back
    assert random_deletion("sunset", random.Random(0), p=1.0) == "sunset"


def test_eda_dispatches_uniformly_to_one_operation(eda, nltk_dir):
    stop = english_stopwords(nltk_dir)
    ops = [
        lambda c, r: synonym_replacement(c, r, eda.synonyms, stop),
        random_swap,
        random_deletion,
    ]
    counts = [0, 0, 0]
    for seed in range(300):
        caption = CAPTIONS[seed % len(CAPTIONS)]
        expected_rng = random.Random(seed)
        op = expected_rng.randrange(3)
        counts[op] += 1
        assert eda(caption, random.Random(seed)) == ops[op](caption, expected_rng)
    assert min(counts) > 70


def test_deterministic_per_seed_and_global_rng_untouched(eda, nltk_dir):
    random.seed(1234)
    state = random.getstate()
    EDA(nltk_dir)  # textaugment reseeded the global RNG here
    first = [eda(c, random.Random(7)) for c in CAPTIONS * 20]
    again = [eda(c, random.Random(7)) for c in CAPTIONS * 20]
    assert first == again
    outs = {eda(CAPTIONS[0], random.Random(seed)) for seed in range(30)}
    assert len(outs) > 10
    assert random.getstate() == state


def test_works_without_omw(eda, nltk_dir):
    assert not (nltk_dir / "corpora" / "omw-1.4").exists()
    assert {"domestic dog", "hound", "canis familiaris"} <= set(eda.synonyms("dog"))
    assert eda.synonyms("dog") == tuple(sorted(eda.synonyms("dog")))


def test_loaded_eda_does_not_depend_on_nltk_data_path(eda, monkeypatch):
    eda("warm up", random.Random(0))
    monkeypatch.setattr(nltk.data, "path", [])
    for word in ("quickly", "eat", "happy", "house"):  # adverb, verb, adjective, noun data files
        assert eda.synonyms(word), word


def test_pickled_copy_gives_the_same_augmentations(eda):
    # Spawned DataLoader workers receive a pickled EDA and load the corpora themselves.
    clone = pickle.loads(pickle.dumps(eda))
    assert [clone(c, random.Random(3)) for c in CAPTIONS] == [eda(c, random.Random(3)) for c in CAPTIONS]


def test_missing_corpora_say_to_run_setup(tmp_path):
    with pytest.raises(InputError, match=r"'wordnet' not found in .*run `declip setup-nltk --data-dir"):
        EDA(tmp_path / "empty")
