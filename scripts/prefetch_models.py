#!/usr/bin/env python
"""Download the full-profile models into the local Hugging Face cache (run once, online).

    python scripts/prefetch_models.py                 # the full profile's models
    python scripts/prefetch_models.py mamba-130m mixtral-8x7b
    python scripts/prefetch_models.py --all           # every hub model in the registry

Only safetensors weights, configs and tokenizer files are fetched. After this, the labs load
these models offline (HF_HUB_OFFLINE=1 works) and `EFFARCH_PROFILE=auto` picks the full profile
on a GPU. Each model's resolved commit is printed: pin it with `load_model(..., revision=...)`.
"""

from __future__ import annotations

import argparse
import sys

from effarch import memory, models

PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("names", nargs="*", help="registry names or hub ids (default: full profile)")
    ap.add_argument("--all", action="store_true", help="every hub model in the registry")
    ap.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    args = ap.parse_args(argv)
    names = args.names or ([n for n, s in models.REGISTRY.items() if s.hub_id and not s.remote_code]
                           if args.all else models.full_profile_names())
    specs = [models.get_spec(n) for n in names]
    shipped = [s.name for s in specs if s.zoo]
    if shipped:
        print(f"{', '.join(shipped)}: part of the tiny zoo, shipped in data/zoo/ (nothing to "
              "fetch); leave them out.", file=sys.stderr)
        return 2
    for spec in specs:
        size = (f"~{memory.estimate_weights_bytes(spec.name) / 1e9:.1f} GB bf16"
                if spec.config else "size unknown")
        print(f"{spec.name:20s} {spec.hub_id:40s} {size}")
    if args.dry_run:
        return 0
    if not models.hub_reachable(timeout=3.0):
        print("The hub cannot be reached from this machine (or HF_HUB_OFFLINE is set): run this "
              "where there is a network. See TROUBLESHOOTING.md, section "
              "'Offline: models not in the cache'.", file=sys.stderr)
        return 2
    from huggingface_hub import snapshot_download

    for spec in specs:
        path = snapshot_download(spec.hub_id, revision=spec.revision, allow_patterns=PATTERNS)
        print(f"{spec.name}: {path}  (commit {path.rstrip('/').split('/')[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
