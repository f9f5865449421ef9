#!/usr/bin/env python
"""Generate the documents' tables (never typed by hand): LAB_PREP.md's model table from effarch's
registry, its quantisation-probe table from the kept ``scripts/probe_quantization.py`` run, and
the per-lab full-profile table of README.md and LAB_PREP.md from the kept runs
(``data/measurements/full_profile_runs.jsonl``, written by ``scripts/run_full_profile.py``).

    python scripts/lab_prep_tables.py          # rewrite the tables
    python scripts/lab_prep_tables.py --check  # exit 1 when a document is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effarch import memory, paths, registry, runs

ROOT = paths.repo_root()


def model_table() -> str:
    rows = ["| model | hub id | parameters (total) | active per token | bf16 | 8-bit (bnb) "
            "| 4-bit (bnb) | FP8 | 4-bit + experts (bnb parametrize) "
            "| in `nn.Linear` (what bnb quantises) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, spec in registry.REGISTRY.items():
        if not spec.config:
            continue
        cfg = registry.get_config(spec)
        pc = memory.count_params(cfg)
        gb = [memory.estimate_weights_bytes(name, "bfloat16", q) / 1e9
              for q in (None, "8bit", "4bit", "fp8", "4bit+experts")]
        skip = spec.skip_quantization or None
        share = memory.quantized_footprint(cfg, "4bit", skip_modules=skip).quantized_share
        rows.append(f"| {name} | `{spec.hub_id}` | {pc.total / 1e9:.2f} B | {pc.active / 1e9:.2f} B"
                    f" | {gb[0]:.1f} GB | {gb[1]:.1f} GB | {gb[2]:.1f} GB | {gb[3]:.1f} GB"
                    f" | {gb[4]:.1f} GB | {share:.1%} |")
    return "\n".join(rows)


def probe_table() -> str:
    """The kept run of scripts/probe_quantization.py (data/measurements/), or a line saying
    there is none yet."""
    probe = memory.kept_quantization_probe()
    if probe is None:
        return ("(no kept run yet: on a GPU, `scripts/probe_quantization.py --json` writes "
                f"`{memory.PROBE_FILE}` into data/measurements)")
    rows = [f"{probe['model']}, {probe['layers']} layers, random weights, on {probe['device_name']} "
            f"(torch {probe['torch']}, transformers {probe['transformers']}), kept in "
            f"`data/measurements/{memory.PROBE_FILE}`:", "",
            "| load | GPU memory allocated | peak during the load | effarch's estimate | "
            "measured ÷ estimate | forward pass | its peak above the weights |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in probe["rows"]:
        fwd = (f"{r['forward_ms']:.0f} ms ({r['tokens']} tokens)" if "forward_ms" in r
               else r.get("forward_error", "—"))
        peak = f"{r['forward_peak_above'] / 1e9:.2f} GB" if "forward_peak_above" in r else "—"
        rows.append(f"| {r['mode']} | {r['allocated'] / 1e9:.2f} GB | "
                    f"{r['peak_during_load'] / 1e9:.2f} GB | {r['estimate'] / 1e9:.2f} GB | "
                    f"{r['allocated'] / r['estimate']:.3f} | {fwd} | {peak} |")
    return "\n".join(rows)


def replace_block(text: str, name: str, body: str) -> str:
    """Put ``body`` between the document's ``<!-- BEGIN/END GENERATED: name -->`` markers."""
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"the markers of the generated {name!r} block are missing. See "
                         "TROUBLESHOOTING.md, section 'Generated documents'.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def documents() -> dict[Path, str]:
    """Each generated document and its text as it should be now."""
    table = runs.runs_table(runs.read_runs())
    lab_prep = (ROOT / "LAB_PREP.md").read_text(encoding="utf-8")
    lab_prep = replace_block(lab_prep, "model table", model_table())
    lab_prep = replace_block(lab_prep, "quantisation probe", probe_table())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return {ROOT / "LAB_PREP.md": replace_block(lab_prep, "full-profile runs", table),
            ROOT / "README.md": replace_block(readme, "full-profile runs", table)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for path, new in documents().items():
        if new != path.read_text(encoding="utf-8"):
            stale.append(path.name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"generated tables are stale in {', '.join(stale)}: run "
              "python scripts/lab_prep_tables.py. See TROUBLESHOOTING.md, section "
              "'Generated documents'.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
