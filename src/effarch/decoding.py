"""One decoding interface for every model the course measures: a transformers causal LM and
``effarch.fast.MambaFastGenerator`` both satisfy :class:`Decoder`, so the measurement protocol
(``effarch.bench``) and the scorer (``effarch.quality``) never ask which one they hold.

A decoder keeps its own state between calls: ``prefill`` runs the prompt and starts a new
generation, ``step`` feeds one token per row. Greedy generation here follows transformers'
``GenerationMixin._sample`` with ``do_sample=False`` (a test checks the same tokens as
``generate()``).

Letters: b batch, l prompt length, V vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch

from effarch import backends, compat
from effarch.paths import TROUBLE


@runtime_checkable
class Decoder(Protocol):
    """What the protocol needs of a model. ``module`` is the ``torch.nn.Module`` whose weights
    run (for train/eval mode and the config), ``mamba_path`` which Mamba path runs ("n/a" for
    no Mamba layer), ``model_class`` a name for the record."""

    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    mamba_path: str
    model_class: str

    def prefill(self, input_ids: torch.Tensor, *,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (b, l), start a new generation; the last position's logits (b, V)."""

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (b,); the next logits (b, V)."""

    def all_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits (b, l, V) of a text, no cache kept (scoring)."""


class TransformersDecoder:
    """A transformers causal LM behind the :class:`Decoder` interface, over its own cache.

    The cache is passed by the keyword this version's forward takes (``effarch.compat``);
    padded prompts keep their mask and positions extended as ``generate()`` does.
    """

    def __init__(self, model: torch.nn.Module):
        first = next(model.parameters())
        self.module, self.device, self.dtype = model, first.device, first.dtype
        self.mamba_path = backends.mamba_path(model)
        self.model_class = type(model).__name__
        self._params = compat.forward_params(model)  # read once, outside timed regions
        self._cache_name = compat.cache_keyword(self._params)
        self._reset()

    def _reset(self) -> None:
        self.cache, self.past_length = None, 0
        self.attention_mask: torch.Tensor | None = None  # (b, l + steps) when padded
        self.position_ids: torch.Tensor | None = None  # (b, 1): the last position used

    def prefill(self, input_ids, *, attention_mask=None):
        self._reset()
        kwargs = {"use_cache": True}
        if "logits_to_keep" in self._params:  # as generate() does: only the last position
            kwargs["logits_to_keep"] = 1
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if "position_ids" in self._params:  # left padding, as generate()
                positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(
                    attention_mask == 0, 0)
                kwargs["position_ids"] = positions
                # generate() drops the mask on Mamba's decode steps; attention needs it extended
                self.attention_mask, self.position_ids = attention_mask, positions[:, -1:]
        out = self.module(input_ids=input_ids, **kwargs)
        returned_name, self.cache = compat.find_cache(out)
        # the keyword in the forward's signature, else (a forward taking **kwargs) the name the
        # output carries the cache under
        self._cache_name = self._cache_name or returned_name
        if self.cache is None:
            raise ValueError(f"{self.model_class} returned no cache (looked for "
                             f"{', '.join(compat.CACHE_NAMES)}); decoding needs a model that "
                             f"supports use_cache=True. {TROUBLE} 'Benchmark settings'.")
        self.past_length = input_ids.shape[1]
        return out.logits[:, -1, :]

    def step(self, token):
        kwargs = {"use_cache": True, self._cache_name: self.cache}
        if "cache_position" in self._params:  # transformers 4.x Mamba tells decode by it
            kwargs["cache_position"] = torch.tensor([self.past_length], device=token.device)
        if self.attention_mask is not None:
            ones = self.attention_mask.new_ones((token.shape[0], 1))
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
            self.position_ids = self.position_ids + 1
            kwargs.update(attention_mask=self.attention_mask, position_ids=self.position_ids)
        out = self.module(input_ids=token.view(-1, 1), **kwargs)
        cache = compat.returned_cache(out)
        self.cache = self.cache if cache is None else cache
        self.past_length += 1
        return out.logits[:, -1, :]

    def all_logits(self, input_ids):
        return self.module(input_ids=input_ids, use_cache=False).logits


def as_decoder(model) -> Decoder:
    """``model`` itself when it already is a :class:`Decoder` (``MambaFastGenerator``), else a
    :class:`TransformersDecoder` around it."""
    return model if isinstance(model, Decoder) else TransformersDecoder(model)


@contextlib.contextmanager
def inference(decoder: Decoder):
    """``eval()`` (no dropout; Mamba's training path differs) and no autograd, then restore."""
    module = decoder.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def greedy_decode(model, input_ids: torch.Tensor, new_tokens: int = 32,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (b, l): the ``new_tokens`` generated tokens (b, n),
    with no stop at end-of-sequence. Matches ``generate(do_sample=False)``."""
    decoder = as_decoder(model)
    input_ids = input_ids.to(decoder.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(decoder.device)
    with inference(decoder):
        token = decoder.prefill(input_ids, attention_mask=attention_mask).argmax(-1)  # (b,)
        tokens = [token]
        for _ in range(new_tokens - 1):
            token = decoder.step(token).argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, dim=-1)
