#!/usr/bin/env python
"""Build the course's shipped corpus: ``data/corpus/{train,validation}.jsonl.xz``.

Four labelled domains, one JSON object per document, ``{"domain", "source", "text"}``:

- ``code``: ``.py`` files of the running CPython's standard library (PSF licence);
- ``prose``: the Python documentation's HTML pages (Debian package ``pythonX.Y-doc``) turned
  into plain paragraphs with ``html.parser``, code samples left out (PSF licence);
- ``arithmetic``: worksheets of sums, products, divisions and word problems (fixed seed);
- ``structured``: JSON and CSV tables of plausible records (fixed seed).

The split is by document: each domain's candidates are ordered by the SHA-256 of their source
name; in that order a document goes to validation while it fits validation's budget (5 %), else
to train while it fits train's, else it is left out. Everything is sorted and seeded, so the same
Python and the same doc package give byte-identical files (``--check`` verifies that).

Usage::

    python scripts/build_corpus.py            # writes data/corpus/ (needs python3.X-doc)
    python scripts/build_corpus.py --check    # rebuilds in a temporary folder, compares hashes

Only the standard library is needed. Install the docs with ``apt-get install python3.11-doc``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import html.parser
import io
import json
import lzma
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "data" / "corpus"
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
# Target bytes per domain (train + validation): ~8 MB, dominated by code and prose.
TARGET_BYTES = {"code": 4_000_000, "prose": 2_800_000, "arithmetic": 560_000, "structured": 640_000}
MAX_DOC_BYTES = 128_000  # so that no single file dominates a split
MIN_DOC_BYTES = 1_000  # stubs and navigation pages carry little text
SEED = 2024

# --- code: the standard library ---------------------------------------------------------------
CODE_EXCLUDE_DIRS = {
    "site-packages", "test", "tests", "idlelib", "encodings",  # tests, IDE, generated codec tables
    "pydoc_data", "__pycache__", "lib2to3/tests", "ensurepip/_bundled",
}
CODE_EXCLUDE_FILES = {"stringprep.py", "this.py"}  # generated tables; rot13 text
CODE_EXCLUDE_PREFIXES = ("_sysconfigdata", "test_")  # machine-specific, generated; stray tests


def code_documents(stdlib: Path, tag: str) -> list[tuple[str, str]]:
    """(source, text) for every eligible ``.py`` file under ``stdlib``, sorted by path."""
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        parts = rel.split("/")
        dirs = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        if any(d in CODE_EXCLUDE_DIRS or d.split("/")[-1] in CODE_EXCLUDE_DIRS for d in dirs):
            continue
        if parts[0].startswith("config-") or parts[-1] in CODE_EXCLUDE_FILES:
            continue
        if parts[-1].startswith(CODE_EXCLUDE_PREFIXES):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append((f"{tag}/Lib/{rel}", text))
    return docs


# --- prose: the Python documentation, HTML to paragraphs ----------------------------------------
PROSE_SECTIONS = ("library", "whatsnew", "howto", "reference", "tutorial", "faq", "using",
                  "extending")
PROSE_TOP_PAGES = ("glossary.html",)
_BLOCK = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "div",
          "section", "ul", "ol", "dl", "caption"}
_SKIP = {"pre", "table", "script", "style"}


class _ProseParser(html.parser.HTMLParser):
    """Paragraph text of a Sphinx page's ``role="main"`` body; code blocks and tables skipped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.main_depth: int | None = None  # div depth of the main body; -1 once it has closed
        self.div_depth = 0
        self.skip: list[list] = []  # [tag, nesting] of the region being skipped
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paragraphs.append(text)

    def _inside(self) -> bool:
        return self.main_depth is not None and self.main_depth != -1

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "div":
            self.div_depth += 1
            if self.main_depth is None and a.get("role") == "main":
                self.main_depth = self.div_depth
        if not self._inside():
            return
        if self.skip:
            if tag == self.skip[-1][0]:
                self.skip[-1][1] += 1
            return
        highlight = tag == "div" and any(c.startswith("highlight") for c in cls)
        if tag in _SKIP or highlight or (tag == "a" and "headerlink" in cls):
            if tag != "a":
                self._flush()
            self.skip.append([tag, 1])
        elif tag in _BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        if self._inside():
            if self.skip:
                if tag == self.skip[-1][0]:
                    self.skip[-1][1] -= 1
                    if self.skip[-1][1] == 0:
                        self.skip.pop()
            elif tag in _BLOCK:
                self._flush()
        if tag == "div":
            if self.main_depth == self.div_depth:
                self._flush()
                self.main_depth = -1
            self.div_depth -= 1

    def handle_data(self, data):
        if self._inside() and not self.skip:
            self.buf.append(data)


def html_to_paragraphs(html_text: str) -> str:
    parser = _ProseParser()
    parser.feed(html_text)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.paragraphs) + "\n"


def prose_documents(html_root: Path, tag: str) -> list[tuple[str, str]]:
    pages = [html_root / p for p in PROSE_TOP_PAGES]
    for section in PROSE_SECTIONS:
        pages += sorted((html_root / section).rglob("*.html"))
    docs = []
    for path in pages:
        rel = path.relative_to(html_root).as_posix()
        if rel.endswith("index.html") or rel.startswith("whatsnew/changelog"):
            continue  # tables of contents; the changelog is a list of issue titles
        text = html_to_paragraphs(path.read_text(encoding="utf-8"))
        if len(text) > 200:
            docs.append((f"{tag}/html/{rel}", text))
    return docs


# --- arithmetic: generated worksheets -----------------------------------------------------------
NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira",
         "Liam", "Maya", "Noor", "Oscar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera",
         "Wei", "Ximena", "Yusuf", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cards", "shells",
         "stamps", "tickets", "eggs", "bottles", "boxes", "seeds", "beads"]


def _operand(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    digits = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def _equation(rng: random.Random) -> str:
    kind = rng.choices(["add", "sub", "mul", "div"], weights=[3, 3, 3, 2])[0]
    if kind == "add":
        a, b = _operand(rng, 1, 5), _operand(rng, 1, 5)
        return f"{a} + {b} = {a + b}"
    if kind == "sub":
        a, b = _operand(rng, 1, 5), _operand(rng, 1, 5)
        return f"{a} - {b} = {a - b}"
    if kind == "mul":
        a, b = _operand(rng, 1, 3), _operand(rng, 1, 2)
        return f"{a} * {b} = {a * b}"
    b, q = rng.randint(2, 99), _operand(rng, 1, 3)
    r = rng.randint(0, b - 1) if rng.random() < 0.5 else 0
    a = b * q + r
    return f"{a} / {b} = {q} remainder {r}" if r else f"{a} / {b} = {q}"


def _word_problem(rng: random.Random) -> str:
    p, q = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return (f"{p} has {a} {item} and gets {b} more from {q}. "
                f"How many {item} does {p} have now?\nAnswer: {a + b}")
    if kind == 1:
        a = rng.randint(10, 199)
        b = rng.randint(1, a)
        return (f"{p} had {a} {item} and gave {b} of them to {q}. "
                f"How many {item} does {p} have left?\nAnswer: {a - b}")
    if kind == 2:
        a, b = rng.randint(2, 25), rng.randint(2, 30)
        return (f"{p} buys {a} packs of {item} with {b} in each pack. "
                f"How many {item} is that in total?\nAnswer: {a * b}")
    k, each = rng.randint(2, 12), rng.randint(2, 40)
    extra = rng.randint(0, k - 1)
    total = k * each + extra
    tail = f", with {extra} left over" if extra else ""
    return (f"{p} shares {total} {item} equally among {k} friends. "
            f"How many {item} does each friend get?\nAnswer: {each}{tail}")


def arithmetic_sheet(index: int) -> str:
    rng = random.Random(f"{SEED}-arithmetic-{index}")
    lines = [f"Worksheet {index}", ""]
    for _ in range(rng.randint(60, 110)):
        if rng.random() < 0.15:
            lines += ["", "Question: " + _word_problem(rng), ""]
        else:
            lines.append(_equation(rng))
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def arithmetic_documents(count: int) -> list[tuple[str, str]]:
    return [(f"generated/arithmetic/sheet-{i:04d}", arithmetic_sheet(i)) for i in range(count)]


# --- structured: generated JSON and CSV ---------------------------------------------------------
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Toronto", "Krakow", "Cairo", "Perth",
          "Bogota", "Hanoi", "Dublin", "Quito", "Seville", "Tartu", "Accra", "Busan", "Porto"]
PRODUCTS = [("notebook", 3.5), ("pen", 1.2), ("stapler", 8.9), ("desk lamp", 24.0),
            ("backpack", 39.5), ("mug", 6.75), ("keyboard", 45.0), ("mouse", 19.99),
            ("monitor", 179.0), ("chair", 129.0), ("cable", 4.25), ("charger", 21.5)]
STATUSES = ["pending", "shipped", "delivered", "returned", "cancelled"]
GENRES = ["fiction", "history", "science", "poetry", "travel", "biography", "cooking"]
WORDS = ["river", "garden", "silent", "north", "glass", "winter", "light", "harbour", "stone",
         "orchard", "letter", "machine", "island", "summer", "forest", "city", "song", "road"]


def _date(rng: random.Random) -> str:
    return f"20{rng.randint(15, 25):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _person(rng, i):
    first, last = rng.choice(NAMES), rng.choice(NAMES) + rng.choice(["son", "ez", "ova", "er"])
    return {"id": i, "name": f"{first} {last}", "age": rng.randint(18, 90),
            "city": rng.choice(CITIES),
            "email": f"{first.lower()}.{last.lower()}@example.org",
            "member_since": _date(rng), "active": rng.random() < 0.8}


def _order(rng, i):
    name, price = rng.choice(PRODUCTS)
    qty = rng.randint(1, 12)
    return {"order_id": f"A{100000 + i * 7 + rng.randint(0, 6)}", "date": _date(rng),
            "product": name, "quantity": qty, "unit_price": price,
            "total": round(qty * price, 2), "status": rng.choice(STATUSES)}


def _weather(rng, i):
    t_min = round(rng.uniform(-15, 25), 1)
    return {"station": rng.choice(CITIES), "date": _date(rng), "t_min_c": t_min,
            "t_max_c": round(t_min + rng.uniform(1, 15), 1),
            "precipitation_mm": round(max(0.0, rng.gauss(2, 4)), 1),
            "wind_kmh": rng.randint(0, 80)}


def _book(rng, i):
    title = " ".join(rng.sample(WORDS, rng.randint(1, 3))).title()
    return {"isbn": f"978-{rng.randint(0, 9)}-{rng.randint(1000, 9999)}-{rng.randint(100, 999)}-"
                    f"{rng.randint(0, 9)}",
            "title": f"The {title}", "author": f"{rng.choice(NAMES)} {rng.choice(NAMES)}",
            "year": rng.randint(1850, 2024), "genre": rng.choice(GENRES),
            "pages": rng.randint(80, 900), "rating": round(rng.uniform(1, 5), 1)}


RECORD_KINDS = {"people": _person, "orders": _order, "weather": _weather, "books": _book}


def structured_table(index: int) -> tuple[str, str]:
    rng = random.Random(f"{SEED}-structured-{index}")
    kind = sorted(RECORD_KINDS)[index % len(RECORD_KINDS)]
    records = [RECORD_KINDS[kind](rng, i + 1) for i in range(rng.randint(8, 30))]
    fmt = ["json", "jsonl", "csv"][(index // len(RECORD_KINDS)) % 3]
    if fmt == "json":
        text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    elif fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        text = buf.getvalue()
    return f"generated/structured/{kind}-{index:04d}.{fmt}", text


def structured_documents(count: int) -> list[tuple[str, str]]:
    return [structured_table(i) for i in range(count)]


# --- split, write, describe ---------------------------------------------------------------------
def split_documents(domain: str, docs: list[tuple[str, str]], target: int) -> dict[str, list]:
    """Assign whole documents to validation, then train, in SHA-256 order of their source."""
    budget = {"validation": int(target * VALIDATION_FRACTION)}
    budget["train"] = target - budget["validation"]
    used = {s: 0 for s in SPLITS}
    out: dict[str, list] = {s: [] for s in SPLITS}
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{domain}:{d[0]}".encode()).hexdigest())
    for source, text in order:
        size = len(text.encode("utf-8"))
        if not MIN_DOC_BYTES <= size <= MAX_DOC_BYTES:
            continue
        for split in ("validation", "train"):
            if used[split] + size <= budget[split]:
                out[split].append({"domain": domain, "source": source, "text": text})
                used[split] += size
                break
    for split in SPLITS:
        out[split].sort(key=lambda r: r["source"])
    return out


def write_jsonl_xz(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    # xz has no timestamps: same records, same liblzma settings, same bytes.
    path.write_bytes(lzma.compress(data.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))


def compression_baselines(records: list[dict]) -> dict:
    """gzip -9 and xz -9e bits per byte of the validation text, whole and per domain.

    The text is joined as ``effarch.data.corpus_text`` joins it (a blank line between documents).
    """
    groups = {"all": records} | {d: [r for r in records if r["domain"] == d] for d in TARGET_BYTES}
    out = {}
    for name, recs in groups.items():
        raw = "\n\n".join(r["text"] for r in recs).encode("utf-8")
        gz = len(gzip.compress(raw, compresslevel=9, mtime=0))
        xz = len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
        out[name] = {"bytes": len(raw), "gzip-9": round(8 * gz / len(raw), 3),
                     "xz-9e": round(8 * xz / len(raw), 3)}
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def debian_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown (dpkg-query unavailable)"


def build(out_dir: Path, stdlib: Path, docs_root: Path, doc_package: str) -> dict:
    py = platform.python_version()
    tag_code = f"cpython-{py}"
    tag_prose = doc_package
    sources = {
        "code": code_documents(stdlib, tag_code),
        "prose": prose_documents(docs_root, tag_prose),
        "arithmetic": arithmetic_documents(500),
        "structured": structured_documents(600),
    }
    splits: dict[str, list] = {s: [] for s in SPLITS}
    counts = {}
    for domain, docs in sources.items():
        parts = split_documents(domain, docs, TARGET_BYTES[domain])
        for split in SPLITS:
            splits[split] += parts[split]
            counts[(domain, split)] = (len(parts[split]),
                                       sum(len(r["text"].encode()) for r in parts[split]))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl.xz"
        write_jsonl_xz(path, splits[split])
        files[split] = {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size,
                        "documents": len(splits[split]),
                        "text_bytes": sum(len(r["text"].encode()) for r in splits[split])}
    manifest = {
        "compression_bits_per_byte": compression_baselines(splits["validation"]),
        "python": py, "stdlib": str(stdlib), "doc_package": doc_package,
        "doc_package_version": debian_version(doc_package), "docs_root": str(docs_root),
        "seed": SEED, "files": files,
        "domains": {d: {s: {"documents": counts[(d, s)][0], "text_bytes": counts[(d, s)][1]}
                        for s in SPLITS} for d in sources},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copyfile(stdlib / "LICENSE.txt", out_dir / "LICENSE-PSF.txt")
    (out_dir / "README.md").write_text(readme(manifest))
    return manifest


def readme(m: dict) -> str:
    rows = []
    for domain, by_split in m["domains"].items():
        t, v = by_split["train"], by_split["validation"]
        rows.append(f"| {domain} | {t['documents']} | {t['text_bytes']:,} | {v['documents']} | "
                    f"{v['text_bytes']:,} |")
    tot = {s: m["files"][s] for s in SPLITS}
    rows.append(f"| **total** | {tot['train']['documents']} | {tot['train']['text_bytes']:,} | "
                f"{tot['validation']['documents']} | {tot['validation']['text_bytes']:,} |")
    baselines = "\n".join(f"| {k} | {v['bytes']:,} | {v['gzip-9']:.3f} | {v['xz-9e']:.3f} |"
                           for k, v in m["compression_bits_per_byte"].items())
    files = "\n".join(f"| `{f['file']}` | {f['bytes']:,} | `{f['sha256']}` |"
                      for f in m["files"].values())
    return f"""# The course corpus

Written by `scripts/build_corpus.py` (this file too: edit the script, not this file).
Every tiny model of the zoo and the shared tokenizer (`data/zoo/tokenizer/`) are trained on
`train.jsonl.xz` only; `validation.jsonl.xz` is held out by **document** (whole files).
Read it with `effarch.data.corpus_text(split)` / `effarch.data.corpus_domains(split)`.

Each line of the `.jsonl.xz` files is one document: `{{"domain": ..., "source": ..., "text": ...}}`.

## Domains, provenance and licence

| domain | what | source | licence |
| --- | --- | --- | --- |
| `code` | `.py` files of the CPython {m['python']} standard library (test suites, `idlelib`, `encodings`, `pydoc_data`, `site-packages`, `_sysconfigdata*`, `stringprep.py`, `this.py` left out) | the running interpreter's `{m['stdlib']}` | PSF License Version 2 (`LICENSE-PSF.txt`); a few modules carry their own permissive notices in the file itself (see the docs' "Licenses and Acknowledgements for Incorporated Software") |
| `prose` | paragraphs of the Python documentation (library, whatsnew, howto, reference, tutorial, faq, using, extending, glossary), converted from HTML with `html.parser`; code blocks, tables and index pages left out | Debian package `{m['doc_package']}` {m['doc_package_version']}, `{m['docs_root']}` | "Python software and documentation are licensed under the PSF License Agreement" (the docs' own licence page; `LICENSE-PSF.txt`) |
| `arithmetic` | worksheets: `a + b`, `a - b`, `a * b`, `a / b = q remainder r`, and short word problems with answers | generated, seed {m['seed']} | part of this repository (Apache-2.0) |
| `structured` | JSON arrays, JSON Lines and CSV tables of people, orders, weather and books | generated, seed {m['seed']} | part of this repository (Apache-2.0) |

## Split rule

Per domain, the candidate documents are ordered by SHA-256 of `"<domain>:<source>"`. In that
order each document goes to validation while it fits validation's budget (5 % of the domain's
target), otherwise to train while it fits train's budget, otherwise it is not used. Documents
under {MIN_DOC_BYTES:,} bytes (stubs, navigation pages) or over {MAX_DOC_BYTES:,} bytes are never used,
so that no single file dominates a split. Targets
(bytes of text, train + validation): {', '.join(f'{k} {v:,}' for k, v in TARGET_BYTES.items())}.

## Figures (bytes of UTF-8 text)

| domain | train docs | train bytes | validation docs | validation bytes |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

`corpus_text(split)` joins the documents with a blank line, so it is a few bytes longer.

## Compression baselines on the validation text (bits per byte)

Reference points for a model's bits per byte on the same text (a compressor sees only this text;
a zoo model also learned from train). Measured with Python's `gzip` (level 9) and `lzma`
(preset 9 | extreme, as `xz -9e`) on the text as `corpus_text` / `domain_text` join it.

| text | bytes | gzip -9 | xz -9e |
| --- | --- | --- | --- |
{baselines}

## Shipped files

| file | bytes | sha256 |
| --- | --- | --- |
{files}

`manifest.json` holds the same figures; `effarch.data` checks these hashes when it loads.

## Rebuilding

`python scripts/build_corpus.py` needs CPython {m['python']} and `apt-get install {m['doc_package']}`
({m['doc_package_version']}) for byte-identical output; `--check` rebuilds in a temporary folder
and compares hashes. Another Python or docs version gives a corpus that differs, and the tokenizer
and the zoo must then be retrained (`scripts/train_tokenizer.py`, `scripts/train_zoo.py`).
"""


def main(argv: list[str] | None = None) -> int:
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--doc-package", default=f"python{ver}-doc")
    ap.add_argument("--docs-root", type=Path, default=Path(f"/usr/share/doc/python{ver}/html"))
    ap.add_argument("--check", action="store_true",
                    help="rebuild in a temporary folder and compare with the shipped files")
    args = ap.parse_args(argv)
    if not (args.docs_root / "library").is_dir():
        sys.exit(f"No HTML docs at {args.docs_root}: `apt-get install {args.doc_package}` "
                 "or pass --docs-root.")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            m = build(Path(tmp), args.stdlib, args.docs_root, args.doc_package)
            bad = [f["file"] for f in m["files"].values()
                   if not (args.out / f["file"]).is_file()
                   or sha256(args.out / f["file"]) != f["sha256"]]
        print("corpus is reproducible" if not bad else f"differs: {', '.join(bad)}")
        return 1 if bad else 0
    m = build(args.out, args.stdlib, args.docs_root, args.doc_package)
    for split, f in m["files"].items():
        print(f"{split}: {f['documents']} documents, {f['text_bytes']:,} bytes of text, "
              f"{f['bytes']:,} bytes in {f['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
