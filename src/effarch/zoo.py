"""The tiny zoo's settings, configs, files and validation measurement.

``data/zoo/zoo_config.json`` holds everything the four models share (corpus, sizes, token
budget, optimiser, schedule, seed, the final evaluation's windows); ``scripts/train_zoo.py``
trains from it (with `effarch.training`) and ``scripts/eval_zoo.py`` measures what it trained.
Both score the validation text through `score_text`, which is `effarch.quality.evaluate_text`:
the figures in ``train_meta.json`` and ``data/zoo/README.md`` are computed as the labs compute
theirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from effarch import data, memory, paths, quality
from effarch.paths import TROUBLE
from effarch.registry import ZOO_NAMES

CONFIG_NAME = "zoo_config.json"
TRAIN_ORDER = ("tiny-transformer", "tiny-moe", "tiny-hybrid", "tiny-mamba")  # fastest first
MOE_TYPES = ("mixtral", "jamba")


def config_file() -> Path:
    """``data/zoo/zoo_config.json``."""
    return paths.zoo_dir() / CONFIG_NAME


def load_settings(path: Path | None = None, *, smoke: bool = False) -> dict:
    """The training settings (``path`` defaults to `config_file`); with ``smoke`` the file's
    ``smoke`` block replaces sizes and budget (CPU tests). ``settings["smoke"]`` says which."""
    settings = json.loads(Path(path or config_file()).read_text(encoding="utf-8"))
    smoke_block = settings.pop("smoke", {})
    settings["smoke"] = smoke
    if not smoke:
        return settings
    for key, value in smoke_block.items():
        if key == "model_overrides":
            for name, over in value.items():
                settings["models"][name]["config"].update(over)
        elif isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        elif not key.startswith("_"):
            settings[key] = value
    return settings


def build_config(name: str, settings: dict):
    """The transformers config of zoo model ``name`` as it is saved (``use_mambapy=False``:
    the labs meet transformers' default Mamba path; training switches mambapy on itself)."""
    from transformers import CONFIG_MAPPING

    spec = settings["models"][name]
    special = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # <|endoftext|> (data.py)
    kw = dict(spec["config"], vocab_size=settings["vocab_size"], **special)
    if spec["model_type"] in MOE_TYPES:
        kw["router_aux_loss_coef"] = settings["router_aux_loss_coef"]
    if spec["model_type"] in ("mamba", "jamba"):
        kw["use_mambapy"] = False
    return CONFIG_MAPPING[spec["model_type"]](**kw)


def is_moe(cfg) -> bool:
    """Whether a zoo config has mixture-of-experts layers (tiny-moe, tiny-hybrid)."""
    return cfg.model_type in MOE_TYPES


def param_report(cfg) -> dict:
    """Total / active / embedding parameters by formula (`effarch.memory.count_params`) and
    the bytes of the weights in bf16."""
    pc = memory.count_params(cfg)
    return dict(total=pc.total, active=pc.active, embedding=pc.embedding, bf16_bytes=2 * pc.total)


def fingerprint(name: str, settings: dict) -> str:
    """What a checkpoint must match to be resumed: the model's and the run's settings (not the
    comments, the GPU estimate or how often checkpoints are written)."""
    keep = {k: v for k, v in settings.items()
            if k not in ("models", "gpu_estimate", "_comment", "checkpoint_minutes")}
    blob = json.dumps([settings["models"][name], keep], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_names(only: str | None = None, *, order: tuple[str, ...] = TRAIN_ORDER) -> list[str]:
    """Zoo names from a comma-separated list (``"mamba,tiny-moe"``), in ``order``; every name
    in ``order`` when ``only`` is empty. Raises ValueError on an unknown name."""
    if not only:
        return list(order)
    wanted = set()
    for n in only.split(","):
        n = n.strip()
        full = n if n.startswith("tiny-") else f"tiny-{n}"
        if full not in ZOO_NAMES:
            raise ValueError(f"unknown model {n!r}; choose from {', '.join(ZOO_NAMES)}. "
                             f"{TROUBLE} 'Training and evaluating the zoo'.")
        wanted.add(full)
    return [n for n in order if n in wanted]


def validation_text(max_chars: int | None = None) -> str:
    """The corpus's validation split (its first ``max_chars`` characters in smoke runs)."""
    text = data.corpus_text("validation")
    return text[:max_chars] if max_chars else text


def score_text(model, tokenizer, text: str, *, window: int, stride: int, batch_size: int,
               capture_routes: bool = False) -> quality.PerplexityResult:
    """The zoo's measurement of a text: `effarch.quality.evaluate_text` with ``batch_size``
    windows per forward, under bf16 autocast on CUDA (training keeps float32 weights there),
    in the model's own dtype elsewhere. ``capture_routes``: see `quality.Routes`."""
    device = next(model.parameters()).device
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    with amp:
        return quality.evaluate_text(model, tokenizer, text, window, stride,
                                     batch_size=batch_size, capture_routes=capture_routes)


def validation_summary(res: quality.PerplexityResult) -> dict:
    """The ``validation`` entry of ``train_meta.json`` (and of eval_zoo's results)."""
    return dict(nll_per_token=res.nll_per_token, tokens=res.tokens_scored, bytes=res.n_bytes,
                bits_per_byte=res.bits_per_byte, window=res.max_length, stride=res.stride)


def read_train_meta(folder: Path) -> dict:
    """A trained model's ``train_meta.json`` (empty when there is none)."""
    path = Path(folder) / "train_meta.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def finished(out_dir: Path, name: str, fp: str) -> dict | None:
    """The metadata of ``out_dir/name`` when that model is saved and was trained with the
    settings of fingerprint ``fp``; None otherwise (train it, or again)."""
    folder = Path(out_dir) / name
    meta = read_train_meta(folder)
    if not meta or not (folder / "model.safetensors").is_file():
        return None
    return meta if meta.get("fingerprint") == fp else None
