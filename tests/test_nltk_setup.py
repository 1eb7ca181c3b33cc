"""`declip setup-nltk`: offline build, corpus zips, NLTK's data path, idempotence, clear failures."""

import json
import time
import zipfile
from pathlib import Path

import nltk
import pytest
import stopwords as pypi_stopwords
from corpora import needs_debian_wordnet
from ports import free_port

from declip.errors import InputError
from declip.text.nltk_setup import (
    DEBIAN_WORDNET_DIR,
    LEXNAMES,
    english_stopwords,
    host_reachable,
    lexnames_text,
    open_wordnet,
    setup_nltk,
)

pytestmark = needs_debian_wordnet


@pytest.fixture(autouse=True)
def _restore_nltk_path(monkeypatch):
    # setup_nltk puts each DATA_DIR on nltk.data.path, where later runs would find (and copy) its corpora.
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The offline route (Debian WordNet + PyPI stopwords) run once into a fresh folder."""
    tmp = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # no ./dataset
        mp.setattr(nltk.data, "path", list(nltk.data.path))
        report = setup_nltk(tmp / "nltk_data", [], allow_download=False, search_nltk_path=False)
    return tmp / "nltk_data", report


@pytest.fixture(scope="module")
def offline_wordnet(offline):
    return open_wordnet(offline[0])


def _zip_corpus(folder: Path, out: Path) -> None:
    # NLTK's package layout: one top-level folder named after the corpus. Stored, not deflated: tests stay fast.
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")


def test_offline_route_builds_working_corpora(offline, offline_wordnet):
    data_dir, report = offline
    c = report["corpora"]
    assert (c["wordnet"]["status"], c["wordnet"]["source"]) == ("installed", f"debian:{DEBIAN_WORDNET_DIR}")
    assert (c["stopwords"]["status"], c["stopwords"]["source"]) == ("installed", "pypi:stopwords 1.0.2")
    assert c["omw-1.4"]["status"] == "missing" and c["omw-1.4"]["tried"] == ["nltk.download: --offline"]
    assert json.loads((data_dir / "setup_nltk.json").read_text()) == report

    wn = offline_wordnet
    assert wn.get_version() == "3.0"
    assert wn.synsets("dog")[0].name() == "dog.n.01"
    assert {"domestic_dog", "Canis_familiaris"} <= {lemma.name() for lemma in wn.synset("dog.n.01").lemmas()}
    assert wn.synsets("dogs")[0].name() == "dog.n.01"  # morphy reads the exception lists and indexes
    assert wn.lemma_from_key("dog%1:05:00::").name() == "dog"  # index.sense
    stop = english_stopwords(data_dir)
    assert "the" in stop and "dog" not in stop
    assert stop == {w for w in pypi_stopwords.get_stopwords("english") if w}
    # copies, never links: NLTK 3.10 refuses symlinks and multiply-linked files
    for f in (data_dir / "corpora").rglob("*"):
        assert not f.is_symlink() and (f.is_dir() or f.stat().st_nlink == 1)
        assert f.stat().st_mode & 0o022 == 0


def test_lexnames_agree_with_wordnet_data(offline, offline_wordnet):
    data_dir, _ = offline
    lines = lexnames_text().splitlines()
    assert len(lines) == len(LEXNAMES) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[5] == "05\tnoun.animal\t1" and lines[44] == "44\tadj.ppl\t3"
    # every synset's lexicographer file number must name a file of its own part of speech
    pos_of = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(data_dir / "corpora" / "wordnet" / f"data.{pos}", encoding="utf8") as fh:
            for line in fh:
                if not line.startswith("  "):
                    _, lex_filenum, ss_type = line.split(" ", 3)[:3]
                    assert LEXNAMES[int(lex_filenum)].startswith(pos_of[ss_type] + "."), line[:40]
    wn = offline_wordnet
    assert wn.synset("dog.n.01").lexname() == "noun.animal"
    assert wn.synset("entity.n.01").lexname() == "noun.Tops"
    assert wn.synset("eat.v.01").lexname() == "verb.consumption"


def test_second_run_is_fast_and_says_already_installed(offline, tmp_path, monkeypatch, capsys):
    data_dir, first = offline
    monkeypatch.chdir(tmp_path)
    mtime = (data_dir / "corpora" / "wordnet" / "data.noun").stat().st_mtime_ns
    t0 = time.perf_counter()
    report = setup_nltk(data_dir, [], allow_download=False, search_nltk_path=False)
    assert time.perf_counter() - t0 < 1.0
    for name in ("wordnet", "stopwords"):
        assert report["corpora"][name]["status"] == "already installed"
        assert report["corpora"][name]["source"] == first["corpora"][name]["source"]
    out = capsys.readouterr().out
    assert f"wordnet: already installed at {data_dir / 'corpora' / 'wordnet'}" in out
    assert (data_dir / "corpora" / "wordnet" / "data.noun").stat().st_mtime_ns == mtime


def test_from_zips(offline, tmp_path, monkeypatch):
    data_dir, _ = offline
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "downloads"
    src.mkdir()
    _zip_corpus(data_dir / "corpora" / "wordnet", src / "wordnet.zip")
    _zip_corpus(data_dir / "corpora" / "stopwords", src / "stopwords.zip")
    omw = tmp_path / "omw" / "omw-1.4"
    (omw / "fra").mkdir(parents=True)
    (omw / "fra" / "wn-data-fra.tab").write_text("# fra\n02084071-n\tfra:lemma\tchien\n")
    _zip_corpus(omw, src / "omw-1.4.zip")
    empty_debian = tmp_path / "no_debian"
    empty_debian.mkdir()

    out = tmp_path / "nltk_data"
    # one zip named directly, the others found in a folder
    report = setup_nltk(
        out, [src / "wordnet.zip", src], allow_download=False, debian_wordnet_dir=empty_debian, search_nltk_path=False
    )
    c = report["corpora"]
    assert c["wordnet"]["source"] == str(src / "wordnet.zip")
    assert c["stopwords"]["source"] == str(src / "stopwords.zip")
    assert c["omw-1.4"]["source"] == str(src / "omw-1.4.zip")
    assert all(entry["status"] == "installed" for entry in c.values())  # installed = NLTK loaded it
    for f in ("data.noun", "index.sense", "lexnames"):
        assert (out / "corpora" / "wordnet" / f).read_bytes() == (data_dir / "corpora" / "wordnet" / f).read_bytes()
    assert (out / "corpora" / "omw-1.4" / "fra" / "wn-data-fra.tab").read_text().endswith("chien\n")
    assert not list((out / "corpora").glob(".*"))  # no staging folder left behind


def test_copies_from_nltk_data_path(offline, tmp_path, monkeypatch):
    """A user who unzipped the seed's zips into ~/nltk_data/corpora: the corpora are copied into DATA_DIR."""
    data_dir, _ = offline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(data_dir)])
    empty_debian = tmp_path / "no_debian"
    empty_debian.mkdir()
    out = tmp_path / "nltk_data"
    report = setup_nltk(out, [], allow_download=False, debian_wordnet_dir=empty_debian)
    assert report["corpora"]["wordnet"]["source"] == str(data_dir / "corpora" / "wordnet")
    assert report["corpora"]["stopwords"]["source"] == str(data_dir / "corpora" / "stopwords")
    assert "the" in english_stopwords(out)
    assert (out / "corpora" / "wordnet" / "data.verb").stat().st_ino != (
        data_dir / "corpora" / "wordnet" / "data.verb"
    ).stat().st_ino


def test_missing_required_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty_debian = tmp_path / "no_debian"
    empty_debian.mkdir()
    out = tmp_path / "nltk_data"
    with pytest.raises(InputError) as e:
        setup_nltk(out, [], allow_download=False, debian_wordnet_dir=empty_debian, search_nltk_path=False)
    msg = str(e.value)
    assert msg.startswith(f"cannot provide required NLTK corpora in {out}: wordnet (tried ")
    assert "nltk.download: --offline" in msg and f"debian:{empty_debian}: lacks cntlist.rev" in msg
    assert "stopwords (" not in msg  # PyPI served it
    assert (out / "corpora" / "stopwords" / "english").is_file()
    assert not (out / "setup_nltk.json").exists()
    with pytest.raises(InputError, match=r"'wordnet' not found in .*run `declip setup-nltk"):
        open_wordnet(out)


def test_unsafe_zip_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "wordnet.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("wordnet/lexnames", "00\tadj.all\t3\n")
        zf.writestr("wordnet/../../escaped", "x")
    empty_debian = tmp_path / "no_debian"
    empty_debian.mkdir()
    with pytest.raises(InputError, match="unsafe member 'wordnet/../../escaped'"):
        setup_nltk(tmp_path / "d", [bad], allow_download=False, debian_wordnet_dir=empty_debian, search_nltk_path=False)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "d" / "corpora" / "wordnet").exists()


def test_missing_from_path_is_named(tmp_path):
    with pytest.raises(InputError, match=f"--from {tmp_path / 'nope.zip'}: no such file or folder"):
        setup_nltk(tmp_path / "d", [tmp_path / "nope.zip"], allow_download=False)


def test_download_probe_is_bounded():
    # An unresolvable name and a closed loopback port: the probe answers False quickly, never hangs.
    closed_port = free_port()
    for url in ("https://nltk-probe.invalid/index.xml", f"https://127.0.0.1:{closed_port}/index.xml"):
        t0 = time.perf_counter()
        assert host_reachable(url, timeout=0.5) is False
        assert time.perf_counter() - t0 < 1.5


def test_cli_offline(offline, tmp_path, monkeypatch, capsys):
    from declip.cli import main

    data_dir, _ = offline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [])  # the CLI also searches NLTK's data path
    assert main(["setup-nltk", "--data-dir", str(data_dir), "--offline"]) == 0
    captured = capsys.readouterr()
    assert "stopwords: already installed" in captured.out
    assert "warning: omw-1.4: missing (optional" in captured.err
