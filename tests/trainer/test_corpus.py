"""The demo corpus: real text in at least three languages, fetched once and cached.

The first run downloads a few MB of Debian packages into ~/.cache/tapestry/corpus (set
TAPESTRY_CACHE to move it); later runs only copy from the cache.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tapestry_trainer.corpus import PACKAGES, clean_fortunes, prepare_demo_corpus

# Frequent short words: a folder in the wrong language would lack them.
MARKERS = {
    "en": (" the ", " and "),
    "de": (" und ", " der "),
    "es": (" que ", " el "),
    "it": (" che ", " di "),
}


def test_clean_fortunes() -> None:
    raw = b"_\x08B_\x08o_\x08l_\x08d text\tand tab\r\n%\n\x1b[1mSecond\x1b[0m\n  -- me\n%\n%\n"
    assert clean_fortunes(raw) == "Bold text  and tab\n\nSecond\n  -- me\n"
    assert clean_fortunes("caf\xe9".encode("latin-1")) == "café\n"
    assert clean_fortunes(b"%\n%\n") == ""


@pytest.mark.network  # apt-get download, unless ~/.cache/tapestry/corpus has the packages
@pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("dpkg-deb")),
    reason="the demo corpus comes from Debian packages",
)
def test_demo_corpus_has_three_languages_of_real_text(tmp_path: Path) -> None:
    folders = prepare_demo_corpus(tmp_path / "corpus")
    assert set(folders) == set(PACKAGES) and len(folders) >= 3
    for language, folder in folders.items():
        files = sorted(folder.glob("*.txt"))
        text = "".join(p.read_text(encoding="utf-8") for p in files)
        assert len(text.encode()) >= 300_000, language
        assert all(marker in text for marker in MARKERS[language]), language
        assert "\x08" not in text and "\x1b" not in text

    started = time.perf_counter()
    assert prepare_demo_corpus(tmp_path / "corpus", ["de"]) == {"de": folders["de"]}
    assert time.perf_counter() - started < 5  # complete folders are left alone
    with pytest.raises(ValueError, match="no demo corpus"):
        prepare_demo_corpus(tmp_path / "corpus", ["xx"])
