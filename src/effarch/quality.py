"""How well a language model predicts a text: the one sliding-window scorer and bits per byte.

Every perplexity and bits-per-byte figure of the course is computed here: the labs' (2.4.1
Part D, 2.4.5), ``scripts/train_zoo.py``'s final evaluation and ``scripts/eval_zoo.py``'s table
in ``data/zoo/README.md``, so they compare.

The method is that of the transformers guide "Perplexity of fixed-length models": windows of
``max_length`` tokens start every ``stride`` tokens; the part of a window that the previous one
already scored is context only (label -100), so each token is scored once, and the last window
ends at the text's end (it may be shorter than ``max_length``). The logits at position t predict
token t + 1, scored in float32 by ``cross_entropy`` rather than read from ``out.loss``, which for
MoE models can include the router's auxiliary loss.

Letters in shapes: N text tokens, b windows in a batch, w window length, V vocabulary,
E experts, k experts per token, m routed positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from effarch import bench
from effarch.decoding import Decoder, TransformersDecoder, as_decoder, inference
from effarch.paths import TROUBLE


@dataclass
class Routes:
    """Which experts the routers chose, at the positions whose predictions were scored.

    ``positions``: (m,) int64, ascending input positions p (the logits at p predict token
    p + 1), each taken from the window that scored its prediction. ``experts``: one (m, k)
    int64 array per MoE layer, in the model's order: the k largest router logits at
    ``positions[i]`` — the experts a softmax top-k router (Mixtral, Jamba, OLMoE, Qwen2-MoE)
    sends the token to.
    """

    positions: np.ndarray
    experts: list[np.ndarray]


@dataclass
class PerplexityResult(bench.RunRecord):
    """Mean negative log-likelihood of the scored tokens, in nats, and what follows from it."""

    nll_per_token: float
    perplexity: float
    bits_per_token: float
    tokens_scored: int
    windows: int
    max_length: int
    stride: int
    n_bytes: int | None = None
    bits_per_byte: float | None = None
    routes: Routes | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The figures and the record, without ``routes`` (arrays, for a table's row)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "routes"}


def scoring_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` of each window over a stream of ``n`` tokens: the window holds
    tokens begin..end-1 and scores tokens first..end-1 (targets; token 0 has no context).

    With ``stride < max_length`` tokens 1..n-1 are scored once each; with ``stride ==
    max_length`` (plain chunks) each chunk's first token is context only, never scored."""
    if not 0 < stride <= max_length:
        raise ValueError(f"need 0 < stride <= max_length, got stride={stride}, "
                         f"max_length={max_length}. {TROUBLE} 'Scoring text'.")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def _routed_logits(decoder: Decoder, ids: torch.Tensor
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Logits (b, w, V) and each MoE layer's router logits, (b·w, E) per layer."""
    out = decoder.module(input_ids=ids, use_cache=False, output_router_logits=True)
    if not getattr(out, "router_logits", None):
        raise ValueError(f"{decoder.model_class} returned no router logits: capture_routes "
                         f"needs a mixture-of-experts model. {TROUBLE} 'Scoring text'.")
    return out.logits, out.router_logits


def _batches(windows: list, batch_size: int) -> list[list]:
    """Consecutive windows grouped by ``batch_size``; a group never mixes lengths."""
    groups: list[list] = []
    for win in windows:
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == win[1] - win[0]:
            last.append(win)
        else:
            groups.append([win])
    return groups


def _group_routes(router_logits, group: list, k: int) -> list[list[np.ndarray]]:
    """Per window of ``group``, per MoE layer: the top-k experts (w', k) at the positions
    whose predictions the window scores (window offsets first-begin-1 .. end-begin-2)."""
    b, w = len(group), group[0][1] - group[0][0]
    layers = [r.float().reshape(b, w, -1) for r in router_logits]                 # (b, w, E)
    return [[lay[row, first - begin - 1:end - begin - 1].topk(k).indices.cpu().numpy()
             for lay in layers] for row, (begin, end, first) in enumerate(group)]


def _score_group(decoder: Decoder, ids: torch.Tensor, group: list, device,
                 routes: list | None):
    """Summed NLL (nats) and count of the scored tokens of equal-length windows (b, w)."""
    x = torch.stack([ids[begin:end] for begin, end, _ in group]).to(device)      # (b, w)
    if routes is None:
        logits = decoder.all_logits(x)
    else:
        logits, router_logits = _routed_logits(decoder, x)
        k = decoder.module.config.num_experts_per_tok
        routes.extend(_group_routes(router_logits, group, k))
    target = x[:, 1:].clone()                                                     # (b, w-1)
    for row, (begin, _, first) in enumerate(group):
        target[row, : first - begin - 1] = -100  # context already scored
    logits = logits[:, :-1]                                                       # (b, w-1, V)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return float(nll), int((target != -100).sum())


def _collect_routes(windows: list, per_window: list[list[np.ndarray]]) -> Routes:
    positions = np.concatenate([np.arange(first - 1, end - 1) for _, end, first in windows])
    experts = [np.concatenate([w[i] for w in per_window]).astype(np.int64)
               for i in range(len(per_window[0]))]
    return Routes(positions=positions.astype(np.int64), experts=experts)


def _check_arguments(decoder: Decoder, input_ids, batch_size, capture_routes) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, N), got {tuple(input_ids.shape)}. "
                         f"{TROUBLE} 'Scoring text'.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}. "
                         f"{TROUBLE} 'Scoring text'.")
    if capture_routes and not isinstance(decoder, TransformersDecoder):
        raise ValueError(f"capture_routes needs a transformers MoE model; {decoder.model_class} "
                         f"has no routers. {TROUBLE} 'Scoring text'.")
    if capture_routes and getattr(decoder.module.config, "num_experts_per_tok", None) is None:
        raise ValueError(f"capture_routes needs a mixture-of-experts model; "
                         f"{decoder.model_class} has no num_experts_per_tok in its config. "
                         f"{TROUBLE} 'Scoring text'.")


def sliding_window_perplexity(model, input_ids: torch.Tensor, *, max_length: int, stride: int,
                              batch_size: int = 1, capture_routes: bool = False, device=None,
                              progress: bool = False, label: str | None = None
                              ) -> PerplexityResult:
    """Perplexity of ``input_ids`` (1, N) with windows of ``max_length`` tokens moving by
    ``stride`` (`scoring_windows`): N − 1 tokens scored when ``stride < max_length``.

    ``batch_size`` windows of equal length run in one forward (the same figures to float
    rounding; 1, the default, reproduces the labs' numbers exactly). ``capture_routes`` (MoE
    models) fills ``result.routes`` (`Routes`) from the same pass (``output_router_logits``).
    ``model`` is a causal LM or any ``effarch.decoding.Decoder`` (the fast Mamba generator
    scores through its own prefill). The mean is weighted by the exact number of tokens each
    window scored.
    """
    decoder = as_decoder(model)
    _check_arguments(decoder, input_ids, batch_size, capture_routes)
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else decoder.device
    windows = scoring_windows(input_ids.shape[1], max_length, stride)
    ids = input_ids[0]                                                            # (N,)
    nll_sum, scored, per_window = 0.0, 0, ([] if capture_routes else None)
    with inference(decoder):
        for group in tqdm(_batches(windows, batch_size), desc="perplexity",
                          disable=not progress):
            group_nll, group_count = _score_group(decoder, ids, group, device, per_window)
            nll_sum, scored = nll_sum + group_nll, scored + group_count
    if scored == 0:
        raise ValueError("no token was scored: the text needs at least two tokens. "
                         f"{TROUBLE} 'Scoring text'.")
    nll = nll_sum / scored
    return PerplexityResult(
        nll_per_token=nll, perplexity=math.exp(nll), bits_per_token=nll / math.log(2),
        tokens_scored=scored, windows=len(windows), max_length=max_length, stride=stride,
        routes=_collect_routes(windows, per_window) if capture_routes else None,
        **bench.run_record(decoder, label=label))


def bits_per_byte(nll_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Total NLL in bits over the text's UTF-8 bytes: nll · tokens / ln 2 / bytes — comparable
    across tokenizers (and with compressors: ``xz`` reaches about 1.7 on Python source)."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive. {TROUBLE} 'Scoring text'.")
    return nll_nats_per_token * n_tokens / math.log(2) / n_bytes


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """The ids `evaluate_text` scores, (1, N): the text's tokens after the tokenizer's start
    token (its BOS, else its EOS, e.g. ``<|endoftext|>``) unless it put one there itself, so
    that the text's first token is predicted and scored too (lm-evaluation-harness's rolling
    log-likelihood does the same). A tokenizer with neither leaves the first token unscored."""
    ids = list(tokenizer(text)["input_ids"])
    start = getattr(tokenizer, "bos_token_id", None)
    if start is None:
        start = getattr(tokenizer, "eos_token_id", None)
    if start is not None and ids[:1] != [start]:
        ids.insert(0, start)
    return torch.tensor(ids, dtype=torch.long).reshape(1, -1)                     # (1, N)


def evaluate_text(model, tokenizer, text: str, max_length: int, stride: int, *,
                  batch_size: int = 1, capture_routes: bool = False, device=None,
                  progress: bool = False, label: str | None = None) -> PerplexityResult:
    """`sliding_window_perplexity` of ``text`` (its `text_ids`) plus its bits per byte, with
    bytes = ``len(text.encode("utf-8"))``: every byte is covered by a scored token when the
    tokenizer has a start token. The other arguments go to `sliding_window_perplexity`."""
    ids = text_ids(tokenizer, text)
    res = sliding_window_perplexity(model, ids, max_length=max_length, stride=stride,
                                    batch_size=batch_size, capture_routes=capture_routes,
                                    device=device, progress=progress, label=label)
    res.n_bytes = len(text.encode("utf-8"))
    res.bits_per_byte = bits_per_byte(res.nll_per_token, res.tokens_scored, res.n_bytes)
    return res
