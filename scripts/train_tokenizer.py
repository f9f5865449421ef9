#!/usr/bin/env python
"""Train the zoo's shared tokenizer: a byte-level BPE on the corpus's ``train`` split only.

Writes ``data/zoo/tokenizer/`` (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``README.md``) so that
``transformers.AutoTokenizer.from_pretrained(path)`` loads it offline, then checks that it
round-trips the validation text byte for byte and reports bytes per token on validation.

GPT-2 style: byte-level pre-tokenisation with GPT-2's split regex, no prefix space, no
normaliser, ByteLevel decoder; one special token, ``<|endoftext|>``, used as bos, eos, pad and
unk (byte-level BPE never needs unk). Training is deterministic: ``--check`` retrains in a
temporary folder and compares ``tokenizer.json``.

Usage::

    python scripts/train_tokenizer.py                 # vocabulary 4096
    python scripts/train_tokenizer.py --check
    python scripts/train_tokenizer.py --compare 4096 8192   # bytes/token only, writes nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from effarch import data

VOCAB_SIZE = 4096


def train(vocab_size: int) -> Tokenizer:
    docs = [d.text for d in data.corpus_domains("train")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[data.EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    eos = data.EOS_TOKEN
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos,
        clean_up_tokenization_spaces=False, model_max_length=1_000_000,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # Name the class every transformers version resolves (5.x aliases it to its backend).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_prefix_space=False,
                  clean_up_tokenization_spaces=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specials = {k: eos for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def measure(fast) -> dict:
    """Round trip and bytes per token on validation, overall and per domain."""
    text = data.corpus_text("validation")
    ids = fast(text, add_special_tokens=False)["input_ids"]
    roundtrip = fast.decode(ids) == text
    per_domain = {}
    for domain in data.DOMAINS:
        t = data.domain_text("validation", domain)
        n = len(fast(t, add_special_tokens=False)["input_ids"])
        per_domain[domain] = len(t.encode("utf-8")) / n
    return {"roundtrip": roundtrip, "tokens": len(ids), "bytes": len(text.encode("utf-8")),
            "bytes_per_token": len(text.encode("utf-8")) / len(ids), "per_domain": per_domain}


def readme(m: dict, vocab_size: int, train_sha: str) -> str:
    rows = "\n".join(f"| {d} | {v:.2f} |" for d, v in m["per_domain"].items())
    return f"""# The zoo's shared tokenizer

Written by `scripts/train_tokenizer.py` (this file too). One byte-level BPE for every zoo model,
so their perplexities compare directly. Load it with `effarch.data.load_tokenizer()` or
`transformers.AutoTokenizer.from_pretrained(<this folder>)` (offline, no remote code).

- vocabulary: {vocab_size} (256 byte symbols, `<|endoftext|>`, learned merges), `min_frequency=2`
- trained with `tokenizers` on `data/corpus/train.jsonl.xz` only (sha256 `{train_sha}`)
- GPT-2 style: ByteLevel pre-tokeniser (GPT-2 regex, `add_prefix_space=False`), no normaliser,
  ByteLevel decoder, `clean_up_tokenization_spaces=False`: `decode(encode(text)) == text`
  byte for byte (checked on the whole validation text: {m['roundtrip']})
- special token: `<|endoftext|>` is bos, eos, pad and unk (byte-level BPE never needs unk); no
  token is added by `encode` — put it between documents yourself when packing sequences

## Bytes per token on the validation split

{m['bytes']:,} bytes → {m['tokens']:,} tokens: **{m['bytes_per_token']:.2f} bytes/token** overall.

| domain | bytes/token |
| --- | --- |
{rows}

License: the tokenizer is derived from the corpus (see `data/corpus/README.md`).
"""


def build(out: Path, vocab_size: int) -> dict:
    from transformers import AutoTokenizer

    save(train(vocab_size), out)
    fast = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    m = measure(fast)
    if not m["roundtrip"]:
        sys.exit("The tokenizer does not round-trip the validation text: not saved correctly.")
    manifest = json.loads((data.corpus_dir() / "manifest.json").read_text())
    (out / "README.md").write_text(readme(m, vocab_size, manifest["files"]["train"]["sha256"]))
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=data.tokenizer_dir())
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--check", action="store_true", help="retrain and compare tokenizer.json")
    ap.add_argument("--compare", type=int, nargs="+", metavar="V",
                    help="report validation bytes/token for these vocabulary sizes, save nothing")
    args = ap.parse_args(argv)
    if args.compare:
        for v in args.compare:
            with tempfile.TemporaryDirectory() as tmp:
                m = build(Path(tmp), v)
            doms = ", ".join(f"{d} {x:.2f}" for d, x in m["per_domain"].items())
            print(f"vocab {v}: {m['bytes_per_token']:.3f} bytes/token ({doms})")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(Path(tmp), args.vocab_size)
            same = [(Path(tmp) / f).read_bytes() == (args.out / f).read_bytes()
                    for f in ("tokenizer.json", "tokenizer_config.json")]
        print("tokenizer is reproducible" if all(same) else "tokenizer differs")
        return 0 if all(same) else 1
    m = build(args.out, args.vocab_size)
    sha = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()
    print(f"vocab {args.vocab_size}: {m['bytes_per_token']:.3f} bytes/token on validation, "
          f"round trip {m['roundtrip']}, tokenizer.json sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
