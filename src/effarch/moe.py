"""Mixture of experts: parameter counts and routing statistics (lab 2.4.3), and the router
half (lab 2.4.4).

Letters: T tokens (batch × sequence, flattened in the model's order), E routed experts per MoE
layer, k experts per token, D domains, N documents. Routing comes from
``effarch.hooks.capture_routing`` (one record per MoE layer and forward call); everything here
takes plain arrays, so it works on any capture.

- Parameter counts: :func:`count_params` (``effarch.memory``'s one formula, for a model or a
  config), :data:`PUBLISHED` (the published figures and how each source counts).
- Layout: :func:`moe_layers`, :func:`n_experts`, :func:`small_config` (a small random config of
  every family, for tests and checks).
- Token labels: :data:`TOKEN_CLASSES`, :func:`code_classes`, :func:`char_labels`,
  :func:`token_labels`.
- Routing statistics: expert load, its entropy and coefficient of variation; mutual information
  with a shuffled baseline; expert shares per domain with a permutation test over documents
  (:func:`domain_test`); the consecutive-token same-expert rate against Σ loadᵢ²
  (:func:`same_expert_rate`).
- The router: :func:`topk_route` (softmax top-k, renormalised or not: :func:`renormalises`),
  :func:`load_balancing_loss` (the Switch loss as transformers computes it, or per layer),
  :func:`capacity_dispatch` and :func:`capacity_sweep` (token dropping), :func:`routed_top_k` and
  :func:`limit_capacity` (interventions on a real model), :func:`router_cases` (a real block's
  choices, for checks), :class:`MoEBlock` and :func:`train_moe_block` (training with and without
  the balancing loss).
"""

from __future__ import annotations

import contextlib
import io
import keyword
import math
import tokenize
from dataclasses import dataclass

import numpy as np
import torch

from effarch import data, memory, registry
from effarch.memory import MOE_FAMILIES, ParamCount  # noqa: F401  (the labs' names for them)
from effarch.paths import TROUBLE

# ============================================================================ parameter counts


def count_params(model_or_config) -> ParamCount:
    """Total and per-token active parameters of a model or config, part by part.

    The formula is ``effarch.memory.count_params`` (one implementation for every family). Given
    a model, its config is counted and the total is checked against the model's own tensors
    (``model.parameters()``: a tied head is one tensor); a mismatch — a family the formula does
    not know — raises instead of returning a wrong count. Quantised models are not checked
    (bitsandbytes packs weights, so their element counts are not parameter counts).
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    pc = memory.count_params(cfg)
    if hasattr(model_or_config, "parameters") and not getattr(cfg, "quantization_config", None):
        held = sum(p.numel() for p in model_or_config.parameters())
        if held != pc.total:
            raise ValueError(
                f"count_params: the formula gives {pc.total:,} parameters for a "
                f"{getattr(cfg, 'model_type', '?')} config but the model holds {held:,}: this "
                f"family (or a config field) is not covered by effarch.memory.count_params. "
                f"{TROUBLE} 'Parameter counts'.")
    return pc


@dataclass(frozen=True)
class PublishedCount:
    """A model's parameter counts as its authors published them (``total``, ``active``: the
    registry's ``published_params`` and ``published_active``, one place for the figures), and
    where and how they counted."""

    total: float
    active: float
    source: str
    convention: str
    active_without_input_embedding: bool = False  # the active figure leaves the table out
    cut_not_rounded: bool = False  # the figure is the count cut to one decimal, not rounded


def _published(name: str, source: str, convention: str, **how) -> PublishedCount:
    spec = registry.get_spec(name)
    if spec.published_params is None or spec.published_active is None:
        raise ValueError(f"the registry has no published counts for {name}: add "
                         "published_params and published_active to its ModelSpec. "
                         f"{TROUBLE} 'Parameter counts'.")
    return PublishedCount(spec.published_params, spec.published_active, source, convention, **how)


PUBLISHED = {
    "mixtral-8x7b": _published(
        "mixtral-8x7b", "Mistral AI, 'Mixtral of experts' (announcement, 2023-12-11); Jiang et "
        "al. 2024, Mixtral of Experts, §2",
        "every parameter: embedding, untied LM head, attention, all 8 experts (total) or the "
        "2 a token uses (active), routers and norms"),
    "olmoe-1b-7b": _published(
        "olmoe-1b-7b", "Muennighoff et al. 2024, OLMoE: Open Mixture-of-Experts Language "
        "Models, Table 1", "every parameter, embedding and untied LM head included (8 of 64 "
        "experts active)"),
    "qwen1.5-moe-a2.7b": _published(
        "qwen1.5-moe-a2.7b", "Qwen team, 'Qwen1.5-MoE: Matching 7B Model Performance with 1/3 "
        "Activated Parameters' (blog, 2024-03-28)", "every parameter, embedding and untied LM "
        "head included (4 of 60 routed experts, the shared expert and its gate active); the "
        "same post quotes 2.0B non-embedding activated parameters"),
    "deepseek-v2-lite": _published(
        "deepseek-v2-lite", "DeepSeek-AI 2024, DeepSeek-V2, Appendix B (DeepSeek-V2-Lite)",
        "total: every parameter; activated: without the input embedding (LM head, the first "
        "dense layer, 2 shared and 6 of 64 routed experts included). That count is 2.45B: "
        "2.4B is it cut to one decimal, not rounded (2.1% above the figure)",
        active_without_input_embedding=True, cut_not_rounded=True),
}


def published_convention_counts(pc: ParamCount, name: str) -> tuple[int, int]:
    """(total, active) of ``pc`` counted the way :data:`PUBLISHED` says ``name``'s authors did."""
    conv = PUBLISHED[name]
    return pc.total, pc.active - (pc.embedding if conv.active_without_input_embedding else 0)


# ==================================================================================== layout


def moe_layers(cfg) -> list[int]:
    """Decoder-layer indices whose feed-forward part is a mixture of experts."""
    return [i for i in range(cfg.num_hidden_layers) if memory.is_moe_layer(cfg, i)]


def n_experts(cfg) -> int:
    """Routed experts per MoE layer, whatever the family calls the field."""
    return memory.n_routed_experts(cfg)


_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
_SMALL_FAMILY = {  # DeepSeek's MLA wants as many KV heads as heads in small configs
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, head_dim=16, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=8, num_experts_per_tok=3),
    "deepseek_v2": dict(num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=3, moe_intermediate_size=32, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, head_dim=8, routed_scaling_factor=1.5),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, head_dim=8, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=5, num_experts_per_tok=2),
    "jamba": dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                  expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0,
                  mamba_d_state=8, mamba_dt_rank=8),
}


def small_config(family: str, **overrides):
    """A small transformers config of an MoE ``family`` (one of ``MOE_FAMILIES``) for random
    weights: 4 layers, hidden 64, vocabulary 128, builds in well under a second. Tests and the
    labs' checks use them to try code on every family (shared experts, dense layers, ties)."""
    if family not in _SMALL_FAMILY:
        raise ValueError(f"unknown MoE family {family!r}; choose from {', '.join(MOE_FAMILIES)}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[family](**{**_SMALL, **_SMALL_FAMILY[family], **overrides})


def _expert_width(cfg) -> int:
    return getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size


def shared_experts(cfg) -> int:
    """Always-on experts per MoE layer (Qwen2-MoE: one, gated; DeepSeek: ``n_shared_experts``)."""
    mt = getattr(cfg, "model_type", "")
    if mt == "qwen2_moe":
        return int(bool(getattr(cfg, "shared_expert_intermediate_size", 0)))
    if mt in ("deepseek_v2", "deepseek_v3"):
        return int(cfg.n_shared_experts or 0)
    return 0


def topk_weighting(cfg) -> str:
    """How the family weighs the k selected experts (checked per family by
    tests/test_hooks_routing.py against what the experts really received)."""
    mt = getattr(cfg, "model_type", "")
    renorm = bool(getattr(cfg, "norm_topk_prob", False))
    return {
        "mixtral": "softmax over all E, top-k renormalised to sum 1",
        "jamba": "softmax over all E, top-k not renormalised",
        "granitemoe": "softmax over the k selected logits",
        "phimoe": "sparsemixer: a masked softmax per choice",
        "deepseek_v2": f"softmax over all E, times routed_scaling_factor "
                       f"{getattr(cfg, 'routed_scaling_factor', 1.0)}",
        "deepseek_v3": f"sigmoid scores{', renormalised' if renorm else ''}, times "
                       f"routed_scaling_factor {getattr(cfg, 'routed_scaling_factor', 1.0)}",
    }.get(mt, "softmax over all E, top-k " + ("renormalised" if renorm else "not renormalised")
          + " (norm_topk_prob)")


def config_summary(cfg) -> dict:
    """What an MoE config says: experts, top-k and their weighting, shared experts, which decoder
    layers are MoE and which dense."""
    moe_idx = moe_layers(cfg)
    return {"model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "experts per MoE layer (E)": n_experts(cfg),
            "experts per token (k)": memory.experts_per_token(cfg),
            "expert width": _expert_width(cfg),
            "shared experts": shared_experts(cfg), "top-k weights": topk_weighting(cfg),
            "MoE layers": moe_idx,
            "dense layers": [i for i in range(cfg.num_hidden_layers) if i not in moe_idx]}


def dense_twin_config(cfg):
    """A dense Llama config with the same attention, layers and vocabulary as an MoE ``cfg`` and
    a SwiGLU as wide as the k experts (plus shared expert) a token uses: about the MoE's active
    parameters (less the routers and any q/k norms), for timing compute against memory. Every
    layer of ``cfg`` must be MoE, with standard attention (not DeepSeek's MLA, not Jamba)."""
    from transformers import LlamaConfig

    if cfg.model_type not in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "phimoe",
                              "granitemoe") or len(moe_layers(cfg)) != cfg.num_hidden_layers:
        raise ValueError(f"no dense twin for {cfg.model_type} with dense layers "
                         f"{config_summary(cfg)['dense layers']}: every layer must be MoE with "
                         "standard attention (Mixtral, OLMoE, Qwen-MoE, PhiMoE, GraniteMoE). "
                         f"{TROUBLE} 'Parameter counts'.")
    width = _expert_width(cfg)
    shared = getattr(cfg, "shared_expert_intermediate_size", 0) if shared_experts(cfg) else 0
    return LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=memory.experts_per_token(cfg) * width
        + shared, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        bos_token_id=0, eos_token_id=0, pad_token_id=0)


# ============================================================================== token labels

TOKEN_CLASSES = ("keyword", "identifier", "punctuation", "whitespace", "number",
                 "string/comment", "prose word")


def rule_class(ch: str) -> int:
    """Class index of one character by rules (no parser): whitespace, number, word, punctuation."""
    if ch.isspace():
        return TOKEN_CLASSES.index("whitespace")
    if ch.isdigit():
        return TOKEN_CLASSES.index("number")
    if ch.isalpha() or ch == "_":
        return TOKEN_CLASSES.index("prose word")
    return TOKEN_CLASSES.index("punctuation")


def code_classes(text: str) -> np.ndarray:
    """One class per character of a Python file, from the ``tokenize`` module; whitespace
    between tokens (indentation included) is whitespace. Where tokenize gives up (a syntax
    error), the rest of the file falls back to the character rules. Returns (len(text),) int8."""
    labels = np.full(len(text), TOKEN_CLASSES.index("whitespace"), dtype=np.int8)
    lines = io.StringIO(text).readlines()  # split as tokenize reads: on "\n" only
    line_starts = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(int)
    kinds = {tokenize.NUMBER: "number", tokenize.OP: "punctuation",
             tokenize.STRING: "string/comment", tokenize.COMMENT: "string/comment"}
    for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):
        if hasattr(tokenize, name):
            kinds[getattr(tokenize, name)] = "string/comment"
    done = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME:
                cls = "keyword" if (keyword.iskeyword(tok.string)
                                    or keyword.issoftkeyword(tok.string)) else "identifier"
            elif tok.type in kinds:
                cls = kinds[tok.type]
            else:  # NEWLINE, NL, INDENT, DEDENT, ENDMARKER, ERRORTOKEN
                cls = "whitespace" if not tok.string.strip() else "punctuation"
            a = int(line_starts[tok.start[0] - 1]) + tok.start[1]
            b = int(line_starts[tok.end[0] - 1]) + tok.end[1]
            labels[a:b] = TOKEN_CLASSES.index(cls)
            done = max(done, b)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        labels[done:] = [rule_class(c) for c in text[done:]]
    return labels


def char_labels(docs) -> tuple[np.ndarray, np.ndarray]:
    """Class and domain index of every character of ``DOC_SEPARATOR.join(docs)``: code by
    ``tokenize``, the other domains (prose, arithmetic, structured) by character rules.
    ``docs``: ``effarch.data.Document`` objects. Returns two (characters,) int8 arrays."""
    classes, domains = [], []
    sep = np.array([rule_class(c) for c in data.DOC_SEPARATOR], dtype=np.int8)
    for i, d in enumerate(docs):
        if i:
            classes.append(sep)
            domains.append(np.full(len(sep), data.DOMAINS.index(d.domain), dtype=np.int8))
        lab = (code_classes(d.text) if d.domain == "code"
               else np.array([rule_class(c) for c in d.text], dtype=np.int8))
        classes.append(lab)
        domains.append(np.full(len(d.text), data.DOMAINS.index(d.domain), dtype=np.int8))
    return np.concatenate(classes), np.concatenate(domains)


def token_labels(tokenizer, text: str, char_cls: np.ndarray, char_dom: np.ndarray):
    """Class of each token of ``text`` = class of its first non-whitespace character (all
    whitespace: whitespace); domain = that of its first character. Tokens as
    ``tokenizer(text, add_special_tokens=False)`` gives them (a fast tokenizer: offsets).
    Returns two (tokens,) int64 arrays."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ws = TOKEN_CLASSES.index("whitespace")
    cls, dom = [], []
    for a, b in enc["offset_mapping"]:
        span = char_cls[a:b]
        solid = [c for ch, c in zip(text[a:b], span, strict=True) if not ch.isspace()]
        cls.append(solid[0] if solid else ws)
        dom.append(char_dom[a] if b > a else char_dom[max(a - 1, 0)])
    return np.array(cls, dtype=np.int64), np.array(dom, dtype=np.int64)


# ======================================================================== routing statistics


def entropy_bits(labels: np.ndarray) -> float:
    """Entropy in bits of the empirical distribution of integer ``labels``."""
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> float:
    """I(X; Y) in bits from paired samples (plug-in estimate over the joint histogram)."""
    joint = np.bincount(x * ny + y, minlength=nx * ny).reshape(nx, ny) / len(x)
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (px @ py)[nz])).sum())


def mi_with_baseline(expert: np.ndarray, label: np.ndarray, n_experts: int, n_labels: int,
                     n_perm: int, seed: int = 0) -> dict:
    """MI(top-1 expert; label) and the same with the labels shuffled ``n_perm`` times over
    tokens: what chance alone gives with this many tokens (the plug-in estimate is biased
    upwards). Shuffling tokens tests independence only; for labels shared by a whole document
    (its domain) use :func:`domain_test`, which shuffles documents."""
    rng = np.random.default_rng(seed)
    mi = mutual_information(expert, label, n_experts, n_labels)
    perm = np.array([mutual_information(expert, rng.permutation(label), n_experts, n_labels)
                     for _ in range(n_perm)])
    return dict(mi_bits=mi, perm_mean=float(perm.mean()), perm_p99=float(np.quantile(perm, 0.99)),
                n_perm=n_perm, tokens=len(label))


def routing_report(cfg, routes: list[np.ndarray], cls: np.ndarray, dom: np.ndarray,
                   n_perm: int) -> list[dict]:
    """Per MoE layer: expert load (share of top-k assignments) and MI with class and domain.
    ``routes``: (n, k) per layer for input positions 0..n-1 (position 0: <|endoftext|>)."""
    e = n_experts(cfg)
    rows = []
    for layer, top in zip(moe_layers(cfg), routes, strict=True):
        load = np.bincount(top.reshape(-1), minlength=e) / top.size
        top1 = top[1:, 0].astype(np.int64)  # drop the <|endoftext|> at position 0
        m = min(len(top1), len(cls))
        rows.append(dict(
            layer=layer, load=load.tolist(),
            starved=[i for i, s in enumerate(load) if s < 0.25 / e],
            mi_class=mi_with_baseline(top1[:m], cls[:m], e, len(TOKEN_CLASSES), n_perm,
                                      seed=layer),
            mi_domain=mi_with_baseline(top1[:m], dom[:m], e, len(data.DOMAINS), n_perm,
                                       seed=100 + layer),
            class_entropy_bits=entropy_bits(cls[:m]), domain_entropy_bits=entropy_bits(dom[:m])))
    return rows


def first_choice(topk_index, topk_weight) -> np.ndarray:
    """Each token's first-choice expert: the selected expert with the largest weight, (T,).

    Not always column 0: DeepSeek's routers take their top-k unsorted."""
    index, weight = np.asarray(topk_index), np.asarray(topk_weight)
    return np.take_along_axis(index, weight.argmax(-1)[:, None], -1)[:, 0].astype(np.int64)


def expert_load(topk_index, n_experts: int) -> np.ndarray:
    """Share of the routing assignments each expert receives, (E,), summing to 1: all k choices
    of (T, k) ``topk_index``, or the first choices when given (T,)."""
    index = np.asarray(topk_index).reshape(-1).astype(np.int64)
    return np.bincount(index, minlength=n_experts) / max(1, index.size)


def load_cv(load) -> float:
    """Coefficient of variation of the expert load (std / mean; 0 when perfectly even)."""
    load = np.asarray(load, dtype=float)
    return float(load.std() / load.mean())


def distribution_entropy_bits(p) -> float:
    """Entropy in bits of a distribution ``p`` (e.g. the expert load; log2 E when even)."""
    p = np.asarray(p, dtype=float)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def router_entropy_bits(logits) -> float:
    """Mean over tokens of the entropy, in bits, of softmax(router logits) (T, E): how sure the
    router is of each token (0: one expert; log2 E: no preference). DeepSeek-V3 scores with a
    sigmoid, so for it this is a property of the logits, not of what it uses."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-(np.exp(logp) * logp).sum(-1).mean() / np.log(2))


@dataclass(frozen=True)
class LoadStats:
    """One MoE layer's load over T tokens: ``load`` (E,) shares of all top-k assignments."""

    load: np.ndarray
    entropy_bits: float        # of the load; maximum log2 E
    max_entropy_bits: float
    cv: float                  # coefficient of variation of the load
    router_entropy_bits: float  # mean per-token entropy of softmax(logits); nan without logits
    tokens: int


def load_stats(topk_index, n_experts: int, logits=None) -> LoadStats:
    """Load, its entropy and coefficient of variation, and the router's per-token entropy."""
    load = expert_load(topk_index, n_experts)
    return LoadStats(load, distribution_entropy_bits(load), float(np.log2(n_experts)),
                     load_cv(load), router_entropy_bits(logits) if logits is not None
                     else float("nan"), int(np.asarray(topk_index).shape[0]))


# --- routing by domain: documents, not tokens, are the unit of the test --------------------


@dataclass(frozen=True)
class DomainTest:
    """Expert shares per domain and whether they differ more than chance (one MoE layer).

    ``p_value``: permutation test of MI(domain; expert) with the domain labels shuffled between
    *documents* (a document's tokens share its domain and its context, so they are not
    independent draws); ``domain_p_values``: the same for each domain's total-variation distance
    from the other domains' shares.
    """

    shares: np.ndarray           # (D, E) share of each domain's assignments per expert
    pooled: np.ndarray           # (E,) share over all documents
    mi_bits: float               # MI(domain; expert) over all top-k assignments
    null_mean: float             # MI with shuffled documents: mean
    null_p99: float              # and 99th percentile
    p_value: float
    domain_distance: np.ndarray  # (D,) total variation between a domain's shares and the rest's
    domain_p_values: np.ndarray  # (D,)
    documents: np.ndarray        # (D,) documents per domain
    tokens: int
    permutations: int


def _mi_from_counts(counts: np.ndarray) -> np.ndarray:
    """MI in bits of joint count tables (..., D, E)."""
    joint = counts / counts.sum(axis=(-2, -1), keepdims=True)
    outer = joint.sum(-1, keepdims=True) * joint.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log2(joint / outer), 0.0)
    return terms.sum(axis=(-2, -1))


def _domain_distance(counts: np.ndarray) -> np.ndarray:
    """(..., D): total variation between each domain's expert shares and all other domains'."""
    rest = counts.sum(-2, keepdims=True) - counts
    share = counts / counts.sum(-1, keepdims=True)
    rest_share = rest / rest.sum(-1, keepdims=True)
    return 0.5 * np.abs(share - rest_share).sum(-1)


def domain_test(topk_index, doc, doc_domain, n_experts: int, n_domains: int, *,
                n_perm: int = 2000, seed: int = 0) -> DomainTest:
    """Expert shares per domain, and a permutation test over documents.

    Args:
        topk_index: (T, k) experts of every token (all k choices count), or (T,) first choices.
        doc: (T,) document index of each token, 0..N-1.
        doc_domain: (N,) domain index of each document, 0..D-1.
    The p-value is (1 + permutations at least as extreme) / (1 + n_perm).
    """
    index = np.asarray(topk_index).reshape(len(doc), -1).astype(np.int64)
    doc, doc_domain = np.asarray(doc, dtype=np.int64), np.asarray(doc_domain, dtype=np.int64)
    per_doc = np.zeros((len(doc_domain), n_experts))               # (N, E) assignment counts
    np.add.at(per_doc, (np.repeat(doc, index.shape[1]), index.reshape(-1)), 1)
    labels = np.eye(n_domains)[doc_domain]                          # (N, D)
    counts = labels.T @ per_doc                                     # (D, E)
    rng = np.random.default_rng(seed)
    perms = np.stack([labels[rng.permutation(len(doc_domain))] for _ in range(n_perm)])
    null = np.einsum("pnd,ne->pde", perms, per_doc)                 # (P, D, E)
    mi, null_mi = _mi_from_counts(counts), _mi_from_counts(null)
    dist, null_dist = _domain_distance(counts), _domain_distance(null)
    return DomainTest(
        shares=counts / counts.sum(-1, keepdims=True), pooled=per_doc.sum(0) / per_doc.sum(),
        mi_bits=float(mi), null_mean=float(null_mi.mean()),
        null_p99=float(np.quantile(null_mi, 0.99)),
        p_value=float((1 + (null_mi >= mi - 1e-12).sum()) / (1 + n_perm)),
        domain_distance=dist, domain_p_values=(1 + (null_dist >= dist - 1e-12).sum(0))
        / (1 + n_perm), documents=labels.sum(0).astype(int), tokens=len(doc),
        permutations=n_perm)


# --- consecutive tokens ----------------------------------------------------------------------


@dataclass(frozen=True)
class SameExpertRate:
    """How often consecutive tokens of a document share their first-choice expert."""

    rate: float     # share of consecutive pairs (within a document) with the same first choice
    chance: float   # Σ loadᵢ², load = first-choice shares of the same tokens: independent tokens
    uniform: float  # 1/E: the chance rate only if every expert had the same load
    pairs: int


def same_expert_rate(top1, doc, n_experts: int) -> SameExpertRate:
    """Rate at which token t+1 keeps token t's first-choice expert, pairs inside one document
    only, against the rate two independent tokens would reach under the measured load: Σ loadᵢ²
    (Jiang et al. 2024, §5, compare with 1/E, which assumes a perfectly even load).

    Args:
        top1: (T,) first-choice expert per token (:func:`first_choice`), in text order.
        doc: (T,) document index per token, or None for one document.
    """
    top1 = np.asarray(top1, dtype=np.int64)
    doc = np.zeros_like(top1) if doc is None else np.asarray(doc)
    same_doc = doc[1:] == doc[:-1]
    pairs = int(same_doc.sum())
    load = expert_load(top1, n_experts)
    rate = float((top1[1:] == top1[:-1])[same_doc].mean()) if pairs else float("nan")
    return SameExpertRate(rate, float((load ** 2).sum()), 1.0 / n_experts, pairs)


# --- which tokens go where -------------------------------------------------------------------


def expert_tokens(ids, top1, n_experts: int, *, min_count: int = 5, top: int = 8) -> list[list]:
    """For each expert, the token ids it takes most often relative to their frequency.

    Returns per expert a list of (token id, tokens of that id routed here, occurrences of that
    id, share routed here), sorted by share then count; ids seen fewer than ``min_count`` times
    are left out (their share is noise)."""
    ids, top1 = np.asarray(ids, dtype=np.int64), np.asarray(top1, dtype=np.int64)
    uniq, inverse, totals = np.unique(ids, return_inverse=True, return_counts=True)
    table = np.zeros((len(uniq), n_experts), dtype=np.int64)        # (ids, E) counts
    np.add.at(table, (inverse, top1), 1)
    out = []
    for e in range(n_experts):
        keep = np.flatnonzero((totals >= min_count) & (table[:, e] > 0))
        share = table[keep, e] / totals[keep]
        order = np.lexsort((-table[keep, e], -share))[:top]
        out.append([(int(uniq[keep[j]]), int(table[keep[j], e]), int(totals[keep[j]]),
                     float(share[j])) for j in order])
    return out


def token_expert_concentration(ids, top1, token_ids, n_experts: int) -> dict:
    """Where the tokens of ``token_ids`` (e.g. every id that decodes to ``self``) go: their
    count, the expert that takes most of them, its share of them, and that expert's overall
    first-choice load (the share it would get by chance)."""
    ids, top1 = np.asarray(ids), np.asarray(top1, dtype=np.int64)
    hit = np.isin(ids, list(token_ids))
    if not hit.any():
        return dict(count=0, expert=None, share=float("nan"), load=float("nan"))
    counts = np.bincount(top1[hit], minlength=n_experts)
    e = int(counts.argmax())
    return dict(count=int(hit.sum()), expert=e, share=float(counts[e] / hit.sum()),
                load=float(expert_load(top1, n_experts)[e]))



# ================================================================ the router half (lab 2.4.4)
#
# A softmax top-k router (Mixtral, Jamba, OLMoE, Qwen2/3-MoE), the Switch Transformer
# load-balancing loss exactly as transformers computes it, capacity and token dropping, and
# interventions on a real model's routing (top-k changed at inference, a capacity imposed).


def renormalises(cfg) -> bool:
    """Whether a softmax top-k family rescales its k weights to sum 1: Mixtral always, Jamba
    never, OLMoE and Qwen2/3-MoE when ``norm_topk_prob`` (transformers' default: False).
    Other families weigh the k experts another way (:func:`topk_weighting`): ValueError."""
    mt = getattr(cfg, "model_type", "")
    if mt == "mixtral":
        return True
    if mt == "jamba":
        return False
    if mt in ("olmoe", "qwen2_moe", "qwen3_moe"):
        return bool(getattr(cfg, "norm_topk_prob", False))
    raise ValueError(f"{mt or type(cfg).__name__} does not route by a plain softmax top-k "
                     f"({topk_weighting(cfg)}). {TROUBLE} 'Router exercises'.")


def topk_route(logits, k: int, *, norm_topk_prob: bool):
    """A softmax top-k router's choice (Mixtral, Jamba, OLMoE, Qwen-MoE; Shazeer et al. 2017).

    Softmax over all E experts in float32, then the k largest probabilities, then — only when
    ``norm_topk_prob`` — divided by their sum (Mixtral does; Jamba and OLMoE do not).

    Args:
        logits: (T, E) router logits.
    Returns:
        ``(weights, indices)``, each (T, k), in descending weight order as ``torch.topk`` gives
        them: weights float32, indices int64.
    """
    probs = torch.softmax(logits.float(), dim=-1)                          # (T, E)
    weights, indices = torch.topk(probs, k, dim=-1)                        # (T, k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _layers(router_logits) -> tuple:
    if isinstance(router_logits, torch.Tensor):
        return (router_logits,)
    layers = tuple(router_logits)
    if not layers:
        raise ValueError("router_logits is empty: pass one (T, E) tensor per MoE layer. "
                         f"{TROUBLE} 'Router exercises'.")
    return layers


def _switch_sums(logits, top_k: int, mask):
    """One layer's (assignment counts (E,), summed router probabilities (E,), tokens counted).
    Softmax in the logits' dtype, sums in float32, as transformers' load_balancing_loss_func."""
    probs = torch.softmax(logits, dim=-1)                                  # (T, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)          # (T·k,)
    weight = mask.repeat_interleave(top_k)                                 # (T·k,)
    counts = torch.zeros(probs.shape[-1], device=probs.device).scatter_add_(0, chosen, weight)
    return counts, (probs.float() * mask[:, None]).sum(0), mask.sum()


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None, *,
                        per_layer: bool = False):
    """The Switch Transformer auxiliary loss ``N · Σ_i f_i · P_i`` (Fedus et al. 2022, eqs. 4-6)
    as transformers' ``load_balancing_loss_func`` computes it (Mixtral, Qwen2-MoE, OLMoE, Jamba
    share it in 5.17 and 5.24; without the coefficient α).

    ``f_i``: the share of tokens that have expert i among their top k (all k choices count, so
    Σ f_i = k); ``P_i``: the mean router probability of expert i. Pooled: f and P averaged over
    the tokens of every layer together, then multiplied; uniform routing gives k (2.0 for
    top-2), every token sent to one expert with probability 1 gives N. ``per_layer=True``: the mean
    of each layer's own loss (how the zoo's tiny-moe was trained): a layer's dead experts can no
    longer hide behind another layer's busy ones.

    Args:
        router_logits: one (T, E) tensor per MoE layer (a tuple, e.g. ``out.router_logits``), or
            one (T, E) tensor.
        attention_mask: (b, l) with b·l = T, 0 at padding (left out of f and P), or None.
    Returns:
        A scalar tensor (differentiable through P).
    """
    layers = _layers(router_logits)
    if per_layer:
        return torch.stack([load_balancing_loss((g,), num_experts, top_k, attention_mask)
                            for g in layers]).mean()
    dev = layers[0].device
    mask = (torch.ones(layers[0].shape[0], device=dev) if attention_mask is None
            else attention_mask.reshape(-1).to(dev, torch.float32))        # (T,)
    counts, probs, rows = 0.0, 0.0, 0.0
    for g in layers:
        c, p, r = _switch_sums(g.to(dev), top_k, mask)
        counts, probs, rows = counts + c, probs + p, rows + r
    return num_experts * ((counts / rows) * (probs / rows)).sum()


# --- capacity and token dropping -----------------------------------------------------------


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert takes: ceil(capacity_factor · T · k / E) (Switch Transformer §2.2;
    capacity factor 1 is exactly the even share)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}. "
                         f"{TROUBLE} 'Router exercises'.")
    return math.ceil(capacity_factor * tokens * top_k / num_experts - 1e-9)


@dataclass(frozen=True)
class Dispatch:
    """Which routing assignments reach their expert when each expert takes ``capacity``.

    ``kept`` (T, k) bool; ``slot`` (T, k) int64: the assignment's place in its expert's buffer
    (-1 when dropped); ``dropped_tokens`` (n,) int64: tokens none of whose k assignments was
    kept (only the residual connection carries them past the layer); ``load`` (E,) assignments
    each expert was sent, before the capacity cut.
    """

    capacity: int
    kept: torch.Tensor
    slot: torch.Tensor
    dropped_tokens: torch.Tensor
    load: torch.Tensor

    @property
    def drop_rate(self) -> float:
        """Share of the T·k assignments dropped."""
        return float(1 - self.kept.float().mean())

    @property
    def token_drop_rate(self) -> float:
        """Share of tokens that lost every assignment."""
        return len(self.dropped_tokens) / self.kept.shape[0]


def capacity_dispatch(indices, num_experts: int, capacity_factor: float, *,
                      priority=None) -> Dispatch:
    """Token dropping at a fixed expert capacity C = :func:`expert_capacity` (Switch
    Transformer, GShard): each expert takes at most C assignments, the rest are dropped.

    Service order: every token's first choice before any token's second choice (GShard's top-2
    gating: a second choice never displaces a first), and within one choice rank by position,
    first come first served — or, with ``priority`` (T,), highest first (Batch Prioritized
    Routing, Riquelme et al. 2021, e.g. each token's largest router weight).

    Args:
        indices: (T, k) experts chosen per token (``topk_route``'s second output).
    """
    indices = torch.as_tensor(indices).long()
    t, k = indices.shape
    cap = expert_capacity(t, k, num_experts, capacity_factor)
    order = (torch.arange(t) if priority is None
             else torch.argsort(torch.as_tensor(priority).float().reshape(t), descending=True,
                                stable=True))
    flat = indices[order].T.reshape(-1)                     # (k·T,) choice-major service order
    by_expert = torch.argsort(flat, stable=True)            # grouped by expert, order kept
    counts = torch.bincount(flat, minlength=num_experts)
    first = torch.cumsum(counts, 0) - counts                # where each expert's group starts
    place = torch.empty_like(flat)                          # (k·T,) place in the expert's buffer
    place[by_expert] = torch.arange(len(flat)) - first[flat[by_expert]]
    slot = torch.empty_like(indices)
    slot[order] = place.reshape(k, t).T
    kept = slot < cap
    slot = torch.where(kept, slot, torch.full_like(slot, -1))
    return Dispatch(cap, kept, slot, torch.nonzero(~kept.any(-1)).reshape(-1),
                    torch.bincount(indices.reshape(-1), minlength=num_experts))


def capacity_sweep(index, weights, num_experts: int, factors, *, dispatch=None) -> list[dict]:
    """Token dropping at each capacity factor of ``factors``, in position order and by
    priority (each token's largest weight), over one layer's routing: the share of assignments
    dropped, of tokens that lost every assignment, and of the routing weight that was dropped.

    Args:
        index, weights: (T, k) experts chosen and their weights.
        dispatch: a ``(indices, E, capacity_factor) -> (capacity, kept)`` function for the
            position order (the lab's exercise); :func:`capacity_dispatch` by default.
    """
    index, weights = torch.as_tensor(index), torch.as_tensor(weights).float()
    rows = []
    for cf in factors:
        for order in ("position", "priority"):
            if order == "position" and dispatch is not None:
                cap, kept = dispatch(index, num_experts, cf)
                kept = torch.as_tensor(kept).bool()
            else:
                prio = weights.max(-1).values if order == "priority" else None
                d = capacity_dispatch(index, num_experts, cf, priority=prio)
                cap, kept = d.capacity, d.kept
            rows.append(dict(
                capacity_factor=cf, order=order, capacity=int(cap),
                assignments_dropped=float(1 - kept.float().mean()),
                tokens_dropped=float((~kept.any(-1)).float().mean()),
                weight_dropped=float((weights * ~kept).sum() / weights.sum())))
    return rows


# --- interventions on a real model's routing ------------------------------------------------


def _blocks(model) -> dict:
    from effarch import hooks

    blocks = hooks.find_moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts layer. "
                         f"{TROUBLE} 'Router exercises'.")
    return blocks


@contextlib.contextmanager
def routed_top_k(model, k: int):
    """Inside the block every MoE layer of ``model`` sends each token to ``k`` experts instead
    of the k it was trained with (the ``top_k`` its block and router read; transformers 5.17
    and 5.24) — weights computed by the family's own rule; the old k is restored on exit."""
    blocks, saved = _blocks(model), []
    n = n_experts(model.config)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and E = {n}, got {k}. {TROUBLE} 'Router exercises'.")
    for block, router, _ in blocks.values():
        holders = [m for m in (block, router) if isinstance(getattr(m, "top_k", None), int)]
        if not holders:
            raise ValueError(f"{type(block).__name__} keeps no top_k to change. "
                             f"{TROUBLE} 'Router exercises'.")
        saved += [(m, m.top_k) for m in holders]
    saved.append((model.config, model.config.num_experts_per_tok))
    try:
        for m, _ in saved[:-1]:
            m.top_k = k
        model.config.num_experts_per_tok = k
        yield model
    finally:
        for m, old in saved[:-1]:
            m.top_k = old
        model.config.num_experts_per_tok = saved[-1][1]


def _drop_hook(capacity_factor, priority, dispatches, module, args, kwargs):
    """Forward pre-hook on an experts module: zero the weights of the assignments dropped at
    ``capacity_factor`` (the token keeps its residual; no renormalisation, as in Switch)."""
    slots = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
    tensors = [(key, a) for key, a in slots if isinstance(a, torch.Tensor)]
    index = next((a for _, a in tensors if not a.is_floating_point()), None)
    key, weight = next(((key, a) for key, a in tensors if index is not None
                        and a.is_floating_point() and a.shape == index.shape), (None, None))
    if weight is None:
        raise RuntimeError("limit_capacity: the experts were called without (top_k_index, "
                           f"top_k_weights). {TROUBLE} 'Router exercises'.")
    prio = weight.max(-1).values.float().cpu() if priority else None
    d = capacity_dispatch(index.cpu(), module_experts(module), capacity_factor, priority=prio)
    dispatches.append(d)
    new = weight * d.kept.to(weight.device, weight.dtype)
    if isinstance(key, int):
        return tuple(new if i == key else a for i, a in enumerate(args)), kwargs
    return args, {**kwargs, key: new}


def module_experts(experts) -> int:
    """E of a fused experts module (its 3-D parameters' first size)."""
    return next(p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3)


@contextlib.contextmanager
def limit_capacity(model, capacity_factor: float, *, priority: bool = False):
    """Inside the block every MoE layer of ``model`` takes at most
    ceil(capacity_factor · T · k / E) assignments per expert per forward call (T: the call's
    tokens, padding included): :func:`capacity_dispatch` in position order, or with
    ``priority`` by each token's largest weight; dropped assignments contribute nothing.
    Yields the list of :class:`Dispatch` es, one per layer per call."""
    from functools import partial

    dispatches: list[Dispatch] = []
    handles = [experts.register_forward_pre_hook(
        partial(_drop_hook, capacity_factor, priority, dispatches), with_kwargs=True)
        for _, _, experts in _blocks(model).values()]
    try:
        yield dispatches
    finally:
        for h in handles:
            h.remove()


def quantize_experts_4bit(model) -> int:
    """Quantise every fused expert tensor of ``model`` to 4-bit NF4 in place with bitsandbytes'
    experimental ``bnb.nn.parametrize.replace_parameter_4bit`` (bitsandbytes ≥ 0.48; transformers
    5.17 and 5.24 never call it): each tensor is stored packed with its absmax scales and
    dequantised whole when the experts run. Returns how many tensors were quantised."""
    try:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit
    except ImportError as exc:
        raise ImportError(f"quantize_experts_4bit needs bitsandbytes >= 0.48 ({exc}). "
                          f"{TROUBLE} 'bitsandbytes on MoE experts'.") from exc
    done = 0
    for _, _, experts in _blocks(model).values():
        for name, p in list(experts.named_parameters(recurse=False)):
            if p.dim() == 3:
                replace_parameter_4bit(experts, name, quant_type="nf4")
                done += 1
    return done


# --- a small reference MoE layer, and training it with and without the balancing loss -------


class Experts(torch.nn.Module):
    """E SwiGLU experts as one module of fused 3-D parameters, as transformers 5 holds them:
    ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I). A plain loop over the experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(num_experts, 2 * intermediate,
                                                           hidden) / hidden ** 0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(num_experts, hidden, intermediate)
                                            / intermediate ** 0.5)

    def forward(self, hidden, top_k_index, top_k_weights):
        """hidden (T, H), top_k_index and top_k_weights (T, k) → (T, H): Σ_j w_j · expert_j(x)."""
        out = torch.zeros_like(hidden)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)                    # (n,), (n,)
            if token.numel():
                gate, up = (hidden[token] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
                y = (torch.nn.functional.silu(gate) * up) @ self.down_proj[e].T  # (n, H)
                out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out


class MoEBlock(torch.nn.Module):
    """A reference MoE layer: a linear router H → E, :func:`topk_route`, :class:`Experts`.

    ``forward(x)`` with x (..., H) returns ``(y, router_logits, top_k_index)``: y (..., H),
    logits (T, E) and index (T, k) with T the tokens of x. ``effarch.hooks.capture_routing``
    finds it like a transformers MoE block.
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *,
                 norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.router = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(hidden, intermediate, num_experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])                                   # (T, H)
        logits = self.router(flat)                                          # (T, E)
        weights, index = topk_route(logits, self.top_k, norm_topk_prob=self.norm_topk_prob)
        return self.experts(flat, index, weights).reshape(x.shape), logits, index


# --- real routing, as exercise cases ----------------------------------------------------------


@dataclass(frozen=True)
class RouterCase:
    """One MoE layer's routing of real tokens: its router's logits, and what the block chose
    (``weights`` as they multiplied the experts, in the model's precision)."""

    model: str
    layer: int
    logits: torch.Tensor    # (T, E) float32
    k: int
    norm_topk_prob: bool
    weights: torch.Tensor   # (T, k) float32 (values of the model's dtype)
    index: torch.Tensor     # (T, k) int64
    dtype: str              # the model's dtype: bfloat16 weights are rounded to 8 bits


def router_cases(model, input_ids, *, name: str, attention_mask=None) -> list[RouterCase]:
    """Run ``model`` on ``input_ids`` (b, l) and return one :class:`RouterCase` per MoE layer
    (real tokens only), read by ``effarch.hooks.capture_routing``."""
    from effarch import hooks

    norm = renormalises(model.config)
    dev = next(model.parameters()).device
    kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(dev)}
    with hooks.capture_routing(model) as trace, torch.no_grad():
        model(input_ids=input_ids.to(dev), use_cache=False, **kw)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    cases = []
    for layer in trace.moe_layers:
        index, weight, logits = trace.tokens(layer)
        cases.append(RouterCase(name, layer, logits, index.shape[1], norm, weight, index, dtype))
    return cases


@dataclass(frozen=True)
class BalanceRun:
    """One training run of a :class:`MoEBlock` (lab 2.4.4, Part E).

    ``load`` (steps, E): each expert's share of the step's top-k assignments; ``mse`` and
    ``aux`` (steps,): the task loss and the balancing loss (computed every step, minimised only
    when ``aux_coef`` > 0); ``val_mse`` and ``val_load`` (E,): on held-out pairs after training.
    """

    aux_coef: float
    seed: int
    load: np.ndarray
    mse: np.ndarray
    aux: np.ndarray
    val_mse: float
    val_load: np.ndarray

    def starved(self, last: int = 50) -> int:
        """Experts with under a quarter of the even share 1/E over the last steps."""
        load = self.load[-last:].mean(0)
        return int((load < 0.25 / len(load)).sum())


def next_vector_pairs(ids: np.ndarray, table: torch.Tensor, positions: np.ndarray):
    """The regression task of Part E: each token's vector (a row of ``table``, (V, H)) and the
    next token's, at ``positions`` of the token stream ``ids``: x, y each (n, H)."""
    return table[torch.from_numpy(ids[positions])], table[torch.from_numpy(ids[positions + 1])]


def train_moe_block(ids: np.ndarray, table: torch.Tensor, val_ids: np.ndarray, *,
                    aux_coef: float, seed: int, steps: int = 400, num_experts: int = 16,
                    top_k: int = 2, intermediate: int = 64, lr: float = 5e-3,
                    batch: int = 1024, progress: bool = False) -> BalanceRun:
    """Train a :class:`MoEBlock` (renormalised top-k) to map a token's vector to the next
    token's (mean squared error), with Adam, minimising ``mse + aux_coef · aux`` where aux is
    :func:`load_balancing_loss`; everything drawn from ``seed``. ``val_ids``: a held-out token
    stream, 8,192 pairs of which are scored after training."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    block = MoEBlock(table.shape[1], intermediate, num_experts, top_k)
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    load, mse, aux = [], [], []
    for _ in tqdm(range(steps), desc=f"aux_coef {aux_coef}", disable=not progress, leave=False):
        x, y = next_vector_pairs(ids, table, rng.integers(0, len(ids) - 1, batch))
        out, logits, index = block(x)
        task, balance = ((out - y) ** 2).mean(), load_balancing_loss(logits, num_experts, top_k)
        opt.zero_grad()
        (task + aux_coef * balance).backward()
        opt.step()
        load.append(np.bincount(index.reshape(-1).numpy(), minlength=num_experts) / index.numel())
        mse.append(task.item())
        aux.append(balance.item())
    with torch.no_grad():
        x, y = next_vector_pairs(val_ids, table, rng.integers(0, len(val_ids) - 1, 8192))
        out, _, index = block(x)
    return BalanceRun(aux_coef, seed, np.array(load), np.array(mse), np.array(aux),
                      float(((out - y) ** 2).mean()),
                      np.bincount(index.reshape(-1).numpy(), minlength=num_experts) / index.numel())
