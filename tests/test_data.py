"""Tests of effarch.data: the shipped corpus and the zoo's shared tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from effarch import data


@pytest.fixture
def empty_repo(tmp_path, monkeypatch):
    """A repository root with no data files, and caches cleared around the test."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("EFFARCH_ROOT", str(tmp_path))
    data.clear_caches()
    yield tmp_path
    data.clear_caches()


@pytest.mark.parametrize("split", data.SPLITS)
def test_split_loads_with_every_domain(split):
    docs = data.corpus_domains(split)
    assert docs and all(isinstance(d, data.Document) for d in docs)
    assert {d.domain for d in docs} == set(data.DOMAINS)
    assert all(d.text and d.source for d in docs)


def test_sizes_match_manifest():
    manifest = json.loads((data.corpus_dir() / "manifest.json").read_text())
    for split in data.SPLITS:
        docs = data.corpus_domains(split)
        for domain in data.DOMAINS:
            n = sum(len(d.text.encode()) for d in docs if d.domain == domain)
            assert n == manifest["domains"][domain][split]["text_bytes"]
    train = manifest["files"]["train"]["text_bytes"]
    validation = manifest["files"]["validation"]["text_bytes"]
    assert 0.03 < validation / (train + validation) < 0.08


def test_splits_are_disjoint_by_document():
    train = {d.source for d in data.corpus_domains("train")}
    validation = {d.source for d in data.corpus_domains("validation")}
    assert train.isdisjoint(validation)


def test_corpus_text_joins_documents():
    text = data.corpus_text("validation")
    docs = data.corpus_domains("validation")
    assert text == data.DOC_SEPARATOR.join(d.text for d in docs)
    assert data.corpus_text("validation") is text  # cached


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match="train, validation"):
        data.corpus_text("test")
    with pytest.raises(ValueError, match="train, validation"):
        data.corpus_domains("valid")


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_domain_samples_are_seeded_and_of_one_domain(domain):
    a = data.domain_samples("validation", domain, n_chars=500, n=3, seed=7)
    assert a == data.domain_samples("validation", domain, n_chars=500, n=3, seed=7)
    assert len(a) == 3 and all(0 < len(s) <= 750 for s in a)
    texts = [d.text for d in data.corpus_domains("validation") if d.domain == domain]
    assert all(any(s in t for t in texts) for s in a)


def test_unknown_domain():
    with pytest.raises(ValueError, match="code, prose"):
        data.domain_samples("validation", "poetry")


def test_tokenizer_round_trips_validation_byte_for_byte():
    tok = data.load_tokenizer()
    text = data.corpus_text("validation")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).encode("utf-8") == text.encode("utf-8")
    assert len(text.encode("utf-8")) / len(ids) > 3.0  # bytes per token


def test_tokenizer_vocabulary_and_special_token():
    tok = data.load_tokenizer()
    assert len(tok) == 4096
    assert tok.eos_token == data.EOS_TOKEN == tok.pad_token == tok.bos_token
    assert tok.convert_tokens_to_ids(data.EOS_TOKEN) == tok.eos_token_id
    tricky = "\tdef f():\n        return  'é中🙂'  \r\n\n"
    assert tok.decode(tok(tricky)["input_ids"]) == tricky


def test_missing_corpus_says_how_to_rebuild(empty_repo):
    with pytest.raises(data.MissingDataError) as err:
        data.corpus_text("train")
    assert "python scripts/build_corpus.py" in str(err.value)
    assert "Missing data files" in str(err.value)


def test_corrupt_corpus_is_detected(empty_repo):
    corpus = empty_repo / "data" / "corpus"
    corpus.mkdir()
    manifest = {"files": {"validation": {"sha256": "0" * 64}}}
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    (corpus / "validation.jsonl.xz").write_bytes(b"not xz")
    with pytest.raises(data.MissingDataError, match="corrupt.*Missing data files"):
        data.corpus_domains("validation")


def test_missing_tokenizer_says_how_to_rebuild(empty_repo):
    with pytest.raises(data.MissingDataError, match="train_tokenizer.py.*Missing data files"):
        data.load_tokenizer()


def test_tokenizer_loads_from_a_copy_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    shutil.copytree(data.tokenizer_dir(), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert tok("x = 1\n")["input_ids"] == data.load_tokenizer()("x = 1\n")["input_ids"]
