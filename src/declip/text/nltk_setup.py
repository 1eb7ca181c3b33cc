"""`declip setup-nltk`: wordnet, omw-1.4 and stopwords in an NLTK data folder the project controls.

Per corpus the first route that works wins:
1. already installed in DATA_DIR/corpora;
2. a corpus zip or folder (NLTK package layout) from `--from`, ./dataset, DATA_DIR/corpora or NLTK's
   default data path (where the seed tells users to unzip them), copied into DATA_DIR;
3. `nltk.download`, only when a 3 s probe reaches NLTK's host (never hangs offline);
4. offline, from what Debian and PyPI provide: WordNet 3.0 from Debian's `wordnet-base` and
   `wordnet-sense-index` packages, the English stop list from the PyPI `stopwords` package.

omw-1.4 (lemma names in other languages) has no offline route and is optional: English EDA never
reads it, and nltk 3.10 looks for omw-2.0 for its multilingual functions anyway.

nltk 3.10 reads only files under a folder on `nltk.data.path` (or NLTK_DATA), refuses symlinks and
hard links, and refuses any corpus file or folder that is group/world-writable or owned by another
account. So corpora are copied (never linked), made `go-w`, and DATA_DIR is put on `nltk.data.path`
by `use_nltk_dir` in every process that reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from declip.errors import InputError

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

CORPORA = ("wordnet", "omw-1.4", "stopwords")
REQUIRED = ("wordnet", "stopwords")
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
PROBE_TIMEOUT_S = 3.0

_POS = ("noun", "verb", "adj", "adv")
# What NLTK's WordNetCorpusReader opens, except `lexnames`, which Debian does not ship.
WORDNET_FILES = (
    "cntlist.rev",
    "index.sense",
    *(f"index.{p}" for p in _POS),
    *(f"data.{p}" for p in _POS),
    *(f"{p}.exc" for p in _POS),
)
# WordNet 3.0 lexicographer files, numbered by position (lexnames(5WN)); the data files store the number.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip


def lexnames_text() -> str:
    """The `lexnames` file: number, name and syntactic category (1 noun, 2 verb, 3 adj, 4 adv), tab-separated."""
    return "".join(f"{i:02d}\t{name}\t{_POS.index(name.split('.')[0]) + 1}\n" for i, name in enumerate(LEXNAMES))


# ---------------------------------------------------------------------------- reading


def use_nltk_dir(path: str | Path) -> Path:
    """Put `path` first on `nltk.data.path`: NLTK searches, and trusts, only folders listed there."""
    import nltk

    root = Path(path).expanduser().resolve()
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def _corpus_root(name: str, nltk_dir: str | Path | None):
    import nltk

    paths = None if nltk_dir is None else [str(use_nltk_dir(nltk_dir))]
    try:
        return nltk.data.find(f"corpora/{name}", paths=paths)
    except (LookupError, PermissionError, ValueError) as e:
        where = f"in {nltk_dir}" if nltk_dir is not None else "on NLTK's data path"
        first = str(e).strip().splitlines()[0] if isinstance(e, PermissionError) else "not found"
        raise InputError(
            f"NLTK corpus {name!r} {first} {where}; run `declip setup-nltk --data-dir {nltk_dir or 'DIR'}`"
        ) from None


def check_corpora(nltk_dir: str | Path | None = None) -> None:
    """Raise InputError (saying to run `declip setup-nltk`) unless the required corpora are there; cheap."""
    for name in REQUIRED:
        _corpus_root(name, nltk_dir)


def open_wordnet(nltk_dir: str | Path | None = None) -> WordNetCorpusReader:
    """English WordNet from `nltk_dir` (or NLTK's data path when None); a few seconds to index."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = _corpus_root("wordnet", nltk_dir)
    with warnings.catch_warnings():
        # English only on purpose: no omw reader is attached, so its "not available" warning is noise.
        warnings.filterwarnings("ignore", message="The multilingual functions")
        try:
            wn = WordNetCorpusReader(root, None)
            # Opens data.{noun,verb,adj,adv} now, while the folder is on nltk.data.path: NLTK checks the path
            # again at each open, and a caller that resets nltk.data.path later must not break the reader.
            for word in ("good", "dog"):  # between them: a noun, a verb, an adjective and an adverb
                wn.synsets(word)
            return wn
        except (OSError, ValueError, AssertionError) as e:
            raise InputError(f"NLTK wordnet at {root} is unreadable ({e}); rerun `declip setup-nltk`") from e


def english_stopwords(nltk_dir: str | Path | None = None) -> frozenset[str]:
    """The `english` list of the stopwords corpus in `nltk_dir` (or NLTK's data path when None)."""
    from nltk.corpus.reader import StopwordsCorpusReader

    root = _corpus_root("stopwords", nltk_dir)
    try:
        return frozenset(StopwordsCorpusReader(root, ["english"], encoding="utf8").words("english"))
    except (OSError, ValueError) as e:
        raise InputError(f"NLTK stopwords at {root} are unreadable ({e}); rerun `declip setup-nltk`") from e


# ---------------------------------------------------------------------------- checking


def _problem(name: str, folder: Path) -> str | None:
    """Why `folder` is not a complete copy of corpus `name` (file checks only), or None."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if name == "wordnet":
        missing = [f for f in (*WORDNET_FILES, "lexnames") if not (folder / f).is_file()]
        return f"{folder} lacks {', '.join(missing)}" if missing else None
    if name == "stopwords":
        return None if (folder / "english").is_file() else f"{folder} lacks english"
    return None if any(folder.iterdir()) else f"{folder} is empty"


def _load_problem(name: str, data_dir: Path) -> str | None:
    """Why NLTK cannot use corpus `name` from `data_dir` (a real load), or None."""
    try:
        if name == "wordnet" and not open_wordnet(data_dir).synsets("dog"):
            return "wordnet loads but has no synsets for 'dog'"
        if name == "stopwords" and "the" not in english_stopwords(data_dir):
            return "the english stop list lacks 'the'"
    except InputError as e:
        return str(e)
    return None


def _zip_prefix(path: Path, name: str) -> str | None:
    """The folder inside zip `path` that holds corpus `name` (`name/` or `corpora/name/`), or None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    for prefix in (f"{name}/", f"corpora/{name}/"):
        if any(n.startswith(prefix) and n != prefix for n in names):
            return prefix
    return None


def _find_in(source: Path, name: str) -> Path | None:
    """The zip or folder holding corpus `name` in `source`: a zip, a folder of zips or corpora, an nltk_data root."""
    if source.is_file():
        return source if _zip_prefix(source, name) else None
    for cand in (source / name, source / f"{name}.zip", source / "corpora" / name, source / "corpora" / f"{name}.zip"):
        if cand.is_dir() and _problem(name, cand) is None:
            return cand
        if cand.is_file() and _zip_prefix(cand, name):
            return cand
    return None


# ---------------------------------------------------------------------------- installing


def _make_private(top: Path) -> None:
    # NLTK refuses group/world-writable corpus files and folders; a umask of 002 would otherwise produce them.
    for current, _, files in os.walk(top):
        os.chmod(current, 0o755)
        for f in files:
            os.chmod(os.path.join(current, f), 0o644)


def _drop_group_write(folder: Path) -> None:
    """`chmod go-w` a folder of ours that NLTK would otherwise refuse to read below."""
    st = folder.stat()
    if st.st_uid == os.geteuid() and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(folder, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def _extract(zip_path: Path, name: str, dest: Path) -> None:
    """Unpack the `name/` folder of `zip_path` into `dest`, refusing links and paths that leave `dest`."""
    prefix = _zip_prefix(zip_path, name)
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = PurePosixPath(info.filename[len(prefix) :])
            if rel.is_absolute() or ".." in rel.parts or stat.S_ISLNK(info.external_attr >> 16):
                raise InputError(f"{zip_path}: unsafe member {info.filename!r}")
            out = dest.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _copy_from(found: Path, name: str) -> Callable[[Path], None]:
    if found.is_dir():
        # copyfile, not copy2/link: fresh single-linked files whose mode comes from _make_private.
        return lambda dest: shutil.copytree(found, dest, dirs_exist_ok=True, copy_function=shutil.copyfile)
    return lambda dest: _extract(found, name, dest)


def _fill_debian_wordnet(debian_dir: Path) -> Callable[[Path], None]:
    def fill(dest: Path) -> None:
        for f in WORDNET_FILES:
            shutil.copyfile(debian_dir / f, dest / f)
        (dest / "lexnames").write_text(lexnames_text())
        (dest / "README").write_text(
            f"WordNet 3.0 (Princeton University; license in the header of each data.* file) copied from\n"
            f"{debian_dir} (Debian wordnet-base + wordnet-sense-index); lexnames written from lexnames(5WN).\n"
        )

    return fill


def _fill_pypi_stopwords(dest: Path) -> None:
    import stopwords as pypi_stopwords

    words = [w for w in pypi_stopwords.get_stopwords("english") if w]
    (dest / "english").write_text("".join(f"{w}\n" for w in words), encoding="utf8")
    (dest / "README").write_text(
        f"English stop list of the PyPI package stopwords {pypi_stopwords.__version__} ({len(words)} words;\n"
        "NLTK's own english list differs in a few entries).\n"
    )


def _install(name: str, data_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Build corpus `name` in a staging folder next to its final place, then rename it into place."""
    corpora = data_dir / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    for folder in (data_dir, corpora):
        _drop_group_write(folder)
    final = corpora / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=corpora))
    try:
        fill(staging)
        _make_private(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def host_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` (default: NLTK's download index) answers an HTTPS HEAD request within `timeout`.

    A real request, not a TCP connect: sandboxes that intercept every connection accept any TCP
    handshake, and a download that then stalls is the hang this probe exists to avoid.
    """
    if url is None:
        from nltk.downloader import Downloader

        url = Downloader.DEFAULT_URL
    ok: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                ok.append(r.status == 200)
        except (OSError, ValueError):
            pass

    # A thread bounds the DNS look-up and TLS handshake too, which the socket timeout alone does not.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


def _download(name: str, data_dir: Path) -> Callable[[Path], None]:
    def fill(dest: Path) -> None:
        import nltk

        if not nltk.download(name, download_dir=str(data_dir), quiet=True, raise_on_error=True, extract=True):
            raise InputError(f"nltk.download({name!r}) failed")
        found = _find_in(data_dir / "corpora", name)
        if found is None:
            raise InputError(f"nltk.download({name!r}) left no {name} in {data_dir / 'corpora'}")
        _copy_from(found, name)(dest)

    return fill


def _routes(
    name: str,
    data_dir: Path,
    sources: list[Path],
    allow_download: bool,
    reachable: Callable[[], bool],
    debian_wordnet_dir: Path,
) -> list[tuple[str, Callable[[Path], None] | str]]:
    """(label, fill function or the reason this route cannot serve) for each route after 'already installed'."""
    routes: list[tuple[str, Callable[[Path], None] | str]] = []
    seen: set[Path] = set()
    for source in sources:
        found = _find_in(source, name) if source.exists() else None
        if found is not None and found.resolve() not in seen and found.resolve() != (data_dir / "corpora" / name):
            seen.add(found.resolve())
            routes.append((str(found), _copy_from(found, name)))
    if not allow_download:
        routes.append(("nltk.download", "--offline"))
    elif not reachable():
        routes.append(("nltk.download", f"NLTK's host not reachable within {PROBE_TIMEOUT_S:g} s"))
    else:
        routes.append(("nltk.download", _download(name, data_dir)))
    if name == "wordnet":
        missing = [f for f in WORDNET_FILES if not (debian_wordnet_dir / f).is_file()]
        label = f"debian:{debian_wordnet_dir}"
        if missing:
            why = f"lacks {', '.join(missing)} (apt-get install wordnet-base wordnet-sense-index)"
            routes.append((label, why))
        else:
            routes.append((label, _fill_debian_wordnet(debian_wordnet_dir)))
    elif name == "stopwords":
        try:
            import stopwords as pypi_stopwords

            routes.append((f"pypi:stopwords {pypi_stopwords.__version__}", _fill_pypi_stopwords))
        except ImportError:
            routes.append(("pypi:stopwords", "not installed (pip install stopwords)"))
    return routes


def _previous_sources(data_dir: Path) -> dict[str, str]:
    try:
        previous = json.loads((data_dir / "setup_nltk.json").read_text())
        return {name: entry["source"] for name, entry in previous["corpora"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def setup_nltk(
    data_dir: Path,
    sources: list[Path],
    allow_download: bool,
    debian_wordnet_dir: Path = DEBIAN_WORDNET_DIR,
    search_nltk_path: bool = True,
) -> dict:
    """Make wordnet and stopwords (required) and omw-1.4 (optional) loadable from `data_dir`.

    `sources`: zips or folders to take corpora from, before ./dataset and NLTK's data path (the latter
    only with `search_nltk_path`). Prints and returns, and writes to DATA_DIR/setup_nltk.json, where each
    corpus came from. Raises InputError naming each required corpus no route could provide.
    """
    import nltk

    for s in sources:
        if not s.exists():
            raise InputError(f"--from {s}: no such file or folder")
    nltk_path = [Path(p) for p in nltk.data.path if isinstance(p, str)] if search_nltk_path else []
    data_dir = use_nltk_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    dataset = [Path("dataset")] if Path("dataset").is_dir() else []
    candidates = [*sources, *dataset, data_dir, *nltk_path]

    probe: list[bool] = []  # probed at most once per run, and only when a corpus gets that far

    def reachable() -> bool:
        if not probe:
            probe.append(host_reachable())
        return probe[0]

    previous = _previous_sources(data_dir)
    report: dict = {"data_dir": str(data_dir), "corpora": {}}
    for name in CORPORA:
        t0 = time.perf_counter()
        final = data_dir / "corpora" / name
        if _problem(name, final) is None:
            entry = {"status": "already installed", "path": str(final), "source": previous.get(name, "unknown")}
        else:
            entry = {"status": "missing", "path": None, "source": None, "tried": []}
            for label, route in _routes(name, data_dir, candidates, allow_download, reachable, debian_wordnet_dir):
                if isinstance(route, str):
                    entry["tried"].append(f"{label}: {route}")
                    continue
                try:
                    _install(name, data_dir, route)
                    why = _problem(name, final) or _load_problem(name, data_dir)
                except Exception as e:  # any failure of one route (a bad zip, a dropped download) means: next route
                    why = f"{type(e).__name__}: {e}"
                if why is None:
                    entry = {"status": "installed", "path": str(final), "source": label}
                    break
                shutil.rmtree(final, ignore_errors=True)
                entry["tried"].append(f"{label}: {why}")
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["corpora"][name] = entry
        optional_missing = entry["status"] == "missing" and name not in REQUIRED
        print(_line(name, entry), file=sys.stderr if optional_missing else sys.stdout)

    missing = [n for n in REQUIRED if report["corpora"][n]["status"] == "missing"]
    if missing:
        details = "; ".join(f"{n} (tried {', '.join(report['corpora'][n]['tried'])})" for n in missing)
        searched = ", ".join(str(c) for c in candidates)
        raise InputError(
            f"cannot provide required NLTK corpora in {data_dir}: {details}; zips/folders searched: {searched}"
        )
    (data_dir / "setup_nltk.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _line(name: str, entry: dict) -> str:
    if entry["status"] == "already installed":
        return f"{name}: already installed at {entry['path']} (from {entry['source']})"
    if entry["status"] == "installed":
        return f"{name}: installed from {entry['source']} -> {entry['path']} ({entry['seconds']} s)"
    if name in REQUIRED:
        return f"{name}: missing; tried: {'; '.join(entry['tried'])}"
    return (
        f"warning: {name}: missing (optional: only lemma names in other languages need it, English EDA works "
        f"without it; pass --from a folder holding {name}.zip); tried: {'; '.join(entry['tried'])}"
    )
