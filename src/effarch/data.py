"""Loaders for what ``data/`` ships: the course corpus and the zoo's shared tokenizer.

The corpus (``data/corpus/``, built by ``scripts/build_corpus.py``, described in its README) has
four labelled domains — ``code`` (Python standard library), ``prose`` (the Python documentation),
``arithmetic`` and ``structured`` (generated) — split by whole document into ``train`` and
``validation``. Every zoo model and the tokenizer (``data/zoo/tokenizer/``, built by
``scripts/train_tokenizer.py``) saw ``train`` only, so perplexities on ``validation`` compare
directly across architectures.

Nothing is read at import; files are read on first use, checked against
``data/corpus/manifest.json`` and cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import random
from dataclasses import dataclass
from pathlib import Path

from effarch import paths
from effarch.paths import TROUBLE

SPLITS = ("train", "validation")
DOMAINS = ("code", "prose", "arithmetic", "structured")
DOC_SEPARATOR = "\n\n"
EOS_TOKEN = "<|endoftext|>"
_HELP = "See TROUBLESHOOTING.md, section 'Missing data files'."


class MissingDataError(FileNotFoundError):
    """A file the course ships is missing or corrupt; the message says how to rebuild it."""


@dataclass(frozen=True)
class Document:
    """One corpus document: ``domain`` (one of ``DOMAINS``), ``source`` (where it came from)."""

    domain: str
    source: str
    text: str


def corpus_dir() -> Path:
    return paths.data_dir() / "corpus"


def tokenizer_dir() -> Path:
    return paths.zoo_dir() / "tokenizer"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    return split


def _missing(what: str, rebuild: str) -> MissingDataError:
    return MissingDataError(f"{what}. Rebuild it with `{rebuild}` from the repository's root "
                            f"(or restore it with git). {_HELP}")


@functools.cache
def _load_split(split: str) -> tuple[Document, ...]:
    folder = corpus_dir()
    rebuild = "python scripts/build_corpus.py"
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        expected = manifest["files"][split]["sha256"]
        raw = (folder / f"{split}.jsonl.xz").read_bytes()
    except FileNotFoundError as e:
        raise _missing(f"The corpus file {e.filename} is missing", rebuild) from None
    except (ValueError, KeyError) as e:
        raise _missing(f"{folder / 'manifest.json'} is corrupt ({e!r})", rebuild) from None
    if hashlib.sha256(raw).hexdigest() != expected:
        raise _missing(f"{folder / (split + '.jsonl.xz')} is corrupt (its sha256 does not match "
                       "manifest.json)", rebuild)
    try:
        # split on "\n" only: str.splitlines would also cut at U+2028 or U+0085 inside a text
        lines = lzma.decompress(raw).decode("utf-8").rstrip("\n").split("\n")
        return tuple(Document(r["domain"], r["source"], r["text"]) for r in map(json.loads, lines))
    except (lzma.LZMAError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise _missing(f"{folder / (split + '.jsonl.xz')} is corrupt ({e!r})", rebuild) from None


def corpus_domains(split: str) -> list[Document]:
    """The documents of ``split`` (``train`` or ``validation``): grouped by domain, in ``DOMAINS``
    order, and sorted by source within a domain."""
    return list(_load_split(_check_split(split)))


@functools.cache
def corpus_text(split: str) -> str:
    """All of ``split`` as one string: the documents joined by ``DOC_SEPARATOR``."""
    return DOC_SEPARATOR.join(d.text for d in _load_split(_check_split(split)))


def domain_text(split: str, domain: str) -> str:
    """The documents of one domain in ``split``, joined by ``DOC_SEPARATOR``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    return DOC_SEPARATOR.join(d.text for d in _load_split(_check_split(split))
                              if d.domain == domain)


def domain_samples(split: str, domain: str, n_chars: int = 2000, n: int = 1,
                   seed: int = 0) -> list[str]:
    """``n`` excerpts of about ``n_chars`` characters from ``domain``, each from a random document.

    An excerpt starts at a line start and ends at a line end where the document allows
    (for routing-by-domain experiments: each sample is text of one domain only). Seeded, so the
    same arguments give the same excerpts.
    """
    docs = [d for d in corpus_domains(split) if d.domain == domain]
    if domain not in DOMAINS or not docs:
        raise ValueError(f"no documents of domain {domain!r} in {split!r}; "
                         f"valid domains: {', '.join(DOMAINS)}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    rng = random.Random(f"{split}:{domain}:{seed}")
    return [_excerpt(rng.choice(docs).text, n_chars, rng) for _ in range(n)]


def _excerpt(text: str, n_chars: int, rng: random.Random) -> str:
    if len(text) <= n_chars:
        return text
    start = rng.randrange(len(text) - n_chars + 1)
    line_start = text.rfind("\n", 0, start) + 1
    end = text.find("\n", line_start + n_chars - 1)
    end = line_start + n_chars if end == -1 or end - line_start > 1.5 * n_chars else end + 1
    return text[line_start:end]


def clear_caches() -> None:
    """Forget what was loaded (after rebuilding the corpus or tokenizer, or in tests)."""
    _load_split.cache_clear()
    corpus_text.cache_clear()
    load_tokenizer.cache_clear()
    long_document.cache_clear()


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The zoo's shared byte-level BPE as a ``transformers`` fast tokenizer (offline, cached).

    ``decode(encode(text)) == text`` for any text (byte-level, no normaliser, no clean-up).
    """
    path = tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        raise _missing(f"The tokenizer is missing ({path / 'tokenizer.json'})",
                       "python scripts/train_tokenizer.py")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


# --- the long document (lab 2.4.1, Part D) -------------------------------------------------


def long_document_dir() -> Path:
    return paths.data_dir() / "long_document"


@functools.cache
def long_document() -> Document:
    """The long public-domain document of ``data/long_document/`` (docutils' ``nodes.py``,
    ~81 KB of Python), checked against its manifest's SHA-256; provenance in its README."""
    folder = long_document_dir()
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        name, digest, domain, source = (manifest[k] for k in ("file", "sha256", "domain",
                                                              "source"))
        raw = (folder / name).read_bytes()
    except FileNotFoundError as e:
        raise MissingDataError(f"The long document's file {e.filename} is missing; restore "
                               f"data/long_document/ with git. {_HELP}") from None
    except (ValueError, KeyError) as e:
        raise MissingDataError(f"{folder / 'manifest.json'} is corrupt ({e!r}); restore it with "
                               f"git. {_HELP}") from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise MissingDataError(f"{folder / name} is corrupt (its sha256 does not match "
                               f"manifest.json); restore it with git. {_HELP}")
    return Document(domain, source, raw.decode("utf-8"))
