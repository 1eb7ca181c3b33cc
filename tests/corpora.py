"""Skip marker for tests that build NLTK corpora from Debian's WordNet (installed by scripts/install.sh)."""

import pytest

from declip.text.nltk_setup import DEBIAN_WORDNET_DIR, WORDNET_FILES

needs_debian_wordnet = pytest.mark.skipif(
    not all((DEBIAN_WORDNET_DIR / f).is_file() for f in WORDNET_FILES),
    reason="needs Debian's wordnet-base and wordnet-sense-index (/usr/share/wordnet)",
)
