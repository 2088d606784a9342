"""The fidelity benchmark's corpus: real human-written text a fresh machine installs by name.

* base pretraining: the GNU Collaborative International Dictionary of English (Debian
  ``dict-gcide``: ``/usr/share/dictd/gcide.dict.dz``, markup stripped);
* fine-tuning and held-out evaluation: the Python 3.11 documentation sources (Debian
  ``python3.11-doc``: ``html/_sources/**/*.rst.txt``), a domain the base has not seen.

The packages are fetched with ``apt-get download`` (nothing is installed system-wide) and
unpacked with ``dpkg-deb -x`` into a cache folder, once. The split is fixed: a documentation
file is held out iff the SHA-256 of its relative path ends in a hex digit below ``2`` (1/8 of
the files), so the held-out text never depends on what else is in the package.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
PACKAGES = {"pretrain": "dict-gcide", "domain": "python3.11-doc"}
GCIDE_FILE = "usr/share/dictd/gcide.dict.dz"
DOCS_DIR = "usr/share/doc/python3.11/html/_sources"
MIN_PARAGRAPH = 60  # characters: shorter pieces are headings, index entries, markup debris


@dataclass(frozen=True)
class Corpus:
    pretrain: list[str]  # paragraphs of the dictionary
    finetune: list[str]  # paragraphs of the documentation files not held out
    heldout: list[str]  # paragraphs of the held-out documentation files

    def describe(self) -> dict:
        return {name: {"paragraphs": len(part), "characters": sum(map(len, part))}
                for name, part in (("pretrain", self.pretrain), ("finetune", self.finetune),
                                   ("heldout", self.heldout))}


def unpacked(package: str, cache: Path) -> Path:
    """The package's files under ``cache/<package>`` (downloaded and unpacked on first use)."""
    root = cache / package
    if (root / ".done").is_file():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        log.info("apt-get download %s", package)
        proc = subprocess.run(["apt-get", "download", "-q", package], cwd=debs, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed ({proc.stderr.strip().splitlines()[-1:]}); "
                               "run `apt-get update` first, or pass --corpus-cache with the package unpacked")
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    (root / ".done").write_text(deb.name + "\n")
    return root


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) >= MIN_PARAGRAPH:
            out.append(para)
    return out


def gcide_paragraphs(root: Path) -> list[str]:
    """Dictionary entries with their SGML-like markup (``<hw>``, ``<def>``, ``<--comments-->``) removed."""
    raw = gzip.open(root / GCIDE_FILE).read().decode("utf-8", errors="replace")
    text = re.sub(r"<--.*?-->", " ", raw, flags=re.S)
    text = re.sub(r"<[^>\n]{0,40}>", " ", text)
    text = re.sub(r"\[[^\]\n]{0,40}\]", " ", text)
    return _paragraphs(text)


def _rst_text(text: str) -> str:
    """reST with directives, literal blocks' markers and role markup reduced to prose."""
    text = re.sub(r"(?m)^\.\. .*$", "", text)  # directives and comments
    text = re.sub(r":[a-z:]+:`([^`<]*?)(?: <[^>]*>)?`", r"\1", text)  # :role:`target <x>` -> target
    text = re.sub(r"(?m)^[=\-~^\"'`#*+]{3,}\s*$", "", text)  # section underlines
    return text.replace("``", "").replace("::", ":")


def is_heldout(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest()[-1], 16) < 2


def docs_paragraphs(root: Path) -> tuple[list[str], list[str]]:
    """(fine-tune, held-out) paragraphs of the documentation sources, split by file."""
    base = root / DOCS_DIR
    finetune, heldout = [], []
    for file in sorted(base.rglob("*.rst.txt")):
        rel = file.relative_to(base).as_posix()
        paras = _paragraphs(_rst_text(file.read_text(encoding="utf-8", errors="replace")))
        (heldout if is_heldout(rel) else finetune).extend(paras)
    return finetune, heldout


def load_corpus(cache: Path) -> Corpus:
    pretrain = gcide_paragraphs(unpacked(PACKAGES["pretrain"], cache))
    finetune, heldout = docs_paragraphs(unpacked(PACKAGES["domain"], cache))
    return Corpus(pretrain=pretrain, finetune=finetune, heldout=heldout)
