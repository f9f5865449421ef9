"""effarch.quality: the one sliding-window scorer, against references computed another way.

Models are tiny and random (hidden 64, 2 layers), built from configs; the lab-against-zoo test
uses the shipped tiny-moe and the zoo's tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from effarch import data, fast, quality, zoo

VOCAB = 256
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)


def _tiny(name: str):
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif name == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2))
    elif name == "jamba":
        model = transformers.JambaForCausalLM(transformers.JambaConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
            mamba_dt_rank=8))
    elif name == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, state_size=8))
    else:
        raise KeyError(name)
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def mixtral():
    return _tiny("mixtral")


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _reference_nll(model, ids, max_length, stride):
    """The transformers guide's loop, written out independently: each window's loss from the
    model itself (``labels=``, mean over its scored targets), the overlap masked with -100."""
    n, prev_end, total, count, windows = ids.shape[1], 0, 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : window.shape[1] - (end - prev_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(window, labels=labels).loss.item() * scored
        count, prev_end, windows = count + scored, end, windows + 1
        if end == n:
            break
    return total / count, count, windows


# --- which tokens are scored ----------------------------------------------------------------


@pytest.mark.parametrize("n, max_length, stride",
                         [(10, 4, 3), (1000, 64, 48), (30, 64, 48), (129, 64, 63), (65, 64, 1)])
def test_every_token_is_scored_exactly_once(n, max_length, stride):
    scored = []
    wins = quality.scoring_windows(n, max_length, stride)
    for begin, end, first in wins:
        assert 0 < end - begin <= max_length and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))
    assert wins[-1][1] == n and [w[0] for w in wins] == list(range(0, stride * len(wins), stride))


def test_stride_equal_to_max_length_leaves_each_chunks_first_token_unscored(llama):
    wins = quality.scoring_windows(40, 16, 16)
    assert wins == [(0, 16, 1), (16, 32, 17), (32, 40, 33)]
    ids = _ids(40)
    res = quality.sliding_window_perplexity(llama, ids, max_length=16, stride=16)
    with torch.no_grad():  # three plain chunks, each the model's own loss
        total = sum(llama(ids[:, i:i + 16], labels=ids[:, i:i + 16]).loss.item()
                    * (min(i + 16, 40) - i - 1) for i in (0, 16, 32))
    assert (res.tokens_scored, res.windows) == (37, 3)
    assert res.nll_per_token == pytest.approx(total / 37, abs=1e-5)


def test_a_text_shorter_than_a_window_is_one_window(llama):
    ids = _ids(40)
    res = quality.sliding_window_perplexity(llama, ids, max_length=64, stride=16)
    with torch.no_grad():
        loss = llama(ids, labels=ids).loss.item()
    assert (res.tokens_scored, res.windows) == (39, 1)
    assert res.nll_per_token == pytest.approx(loss, abs=1e-5)
    assert res.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert res.bits_per_token == pytest.approx(loss / math.log(2), abs=1e-5)


@pytest.mark.parametrize("max_length, stride", [(16, 5), (32, 24), (16, 15), (128, 7)])
def test_matches_the_guides_loop(llama, max_length, stride):
    ids = _ids(77)
    res = quality.sliding_window_perplexity(llama, ids, max_length=max_length, stride=stride)
    nll, count, windows = _reference_nll(llama, ids, max_length, stride)
    assert (res.tokens_scored, res.windows) == (count, windows)
    assert res.nll_per_token == pytest.approx(nll, abs=1e-5)


# --- batching --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "mixtral", "jamba", "mamba"])
def test_batched_equals_unbatched(name):
    model = _tiny(name)
    ids = _ids(150)
    one = quality.sliding_window_perplexity(model, ids, max_length=32, stride=24)
    assert one.windows == 6  # five full windows and a short last one
    for batch_size in (2, 4, 16):
        many = quality.sliding_window_perplexity(model, ids, max_length=32, stride=24,
                                                 batch_size=batch_size)
        assert (many.tokens_scored, many.windows) == (one.tokens_scored, one.windows) == (149, 6)
        assert many.nll_per_token == pytest.approx(one.nll_per_token, rel=1e-5), batch_size


def test_bad_arguments_are_refused(llama):
    with pytest.raises(ValueError, match="stride"):
        quality.sliding_window_perplexity(llama, _ids(20), max_length=8, stride=9)
    with pytest.raises(ValueError, match=r"\(1, N\)"):
        quality.sliding_window_perplexity(llama, _ids(20).repeat(2, 1), max_length=8, stride=4)
    with pytest.raises(ValueError, match="batch_size"):
        quality.sliding_window_perplexity(llama, _ids(20), max_length=8, stride=4, batch_size=0)
    with pytest.raises(ValueError, match="no token"):
        quality.sliding_window_perplexity(llama, _ids(1), max_length=8, stride=4)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        quality.sliding_window_perplexity(llama, _ids(20), max_length=8, stride=4,
                                          capture_routes=True)


def test_the_model_is_left_as_it_was(llama):
    llama.train()
    try:
        quality.sliding_window_perplexity(llama, _ids(20), max_length=8, stride=4)
        assert llama.training
    finally:
        llama.eval()


# --- router capture --------------------------------------------------------------------------


def _router_choices(model, ids) -> list[torch.Tensor]:
    """The experts each MoE layer really used, (T, k) per layer, as ``effarch.hooks``
    records them (an independent path: the routers' own outputs, on 5.17 and 5.24)."""
    from effarch.hooks import capture_routing

    with torch.no_grad(), capture_routing(model) as trace:
        model(input_ids=ids, use_cache=False)
    return [trace.get(layer).topk_index for layer in trace.moe_layers]


@pytest.mark.parametrize("name, layers", [("mixtral", 2), ("jamba", 1)])
def test_routes_are_the_routers_own_choices_at_each_scored_position(name, layers):
    model = _tiny(name)
    ids = _ids(100)
    res = quality.sliding_window_perplexity(model, ids, max_length=32, stride=24,
                                            batch_size=3, capture_routes=True)
    routes = res.routes
    assert np.array_equal(routes.positions, np.arange(99))  # the logits at p predict p + 1
    assert len(routes.experts) == layers
    assert all(e.shape == (99, 2) and e.dtype == np.int64 for e in routes.experts)
    # each position's route comes from the window that scored its prediction
    for begin, end, first in quality.scoring_windows(100, 32, 24):
        own = _router_choices(model, ids[:, begin:end])                    # (w, k) per layer
        for layer in range(layers):
            want = own[layer][first - 1 - begin:end - 1 - begin].sort(-1).values.numpy()
            got = np.sort(routes.experts[layer][first - 1:end - 1], axis=-1)
            assert np.array_equal(got, want), (begin, layer)
    plain = quality.sliding_window_perplexity(model, ids, max_length=32, stride=24)
    assert res.nll_per_token == pytest.approx(plain.nll_per_token, rel=1e-5)


def test_routes_skip_positions_whose_prediction_is_not_scored(mixtral):
    res = quality.sliding_window_perplexity(mixtral, _ids(40), max_length=16, stride=16,
                                            capture_routes=True)
    # chunks 0-15, 16-31, 32-39: positions 15 and 31 predict a chunk's unscored first token
    want = [p for p in range(39) if p not in (15, 31)]
    assert res.routes.positions.tolist() == want
    assert res.routes.experts[0].shape == (37, 2) and res.tokens_scored == 37


# --- the fast generator ----------------------------------------------------------------------


def test_the_fast_generator_scores_like_the_model():
    model = _tiny("mamba")
    gen = fast.MambaFastGenerator(model, use_graph=False)
    ids = _ids(90)
    slow = quality.sliding_window_perplexity(model, ids, max_length=32, stride=16)
    for batch_size in (1, 4):
        quick = quality.sliding_window_perplexity(gen, ids, max_length=32, stride=16,
                                                  batch_size=batch_size)
        assert (quick.tokens_scored, quick.windows) == (slow.tokens_scored, slow.windows)
        assert quick.nll_per_token == pytest.approx(slow.nll_per_token, rel=1e-5)
    assert quick.mamba_path.startswith("effarch fast path")
    assert quick.model_class == "MambaFastGenerator(MambaForCausalLM)"
    with pytest.raises(ValueError, match="routers"):
        quality.sliding_window_perplexity(gen, ids, max_length=32, stride=16,
                                          capture_routes=True)


# --- text, bytes and the record ---------------------------------------------------------------


class ByteTokenizer:
    """One token per UTF-8 byte; ``eos_token_id`` only when given."""

    def __init__(self, eos: int | None = None, add: int | None = None):
        if eos is not None:
            self.eos_token_id = eos
        self.add = add

    def __call__(self, text):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([self.add] if self.add is not None else []) + ids}


def test_text_ids_put_the_start_token_first_once():
    assert quality.text_ids(ByteTokenizer(), "ab").tolist() == [[97, 98]]
    assert quality.text_ids(ByteTokenizer(eos=0), "ab").tolist() == [[0, 97, 98]]
    assert quality.text_ids(ByteTokenizer(eos=0, add=0), "ab").tolist() == [[0, 97, 98]]
    tok = data.load_tokenizer()  # the zoo's: <|endoftext|> is its BOS and EOS, never added
    ids = quality.text_ids(tok, "def f(x):")
    assert ids[0, 0] == tok.eos_token_id and ids.shape[1] == 1 + len(tok("def f(x):")["input_ids"])


def test_bits_per_byte():
    assert quality.bits_per_byte(math.log(2), 10, 5) == pytest.approx(2.0)
    assert quality.bits_per_byte(1.0, 300, 1000) == pytest.approx(300 / math.log(2) / 1000)
    with pytest.raises(ValueError):
        quality.bits_per_byte(1.0, 3, 0)


@pytest.mark.parametrize("eos, unscored", [(None, 1), (0, 0)])
def test_evaluate_text_covers_the_bytes(llama, eos, unscored):
    text = "def f(x):\n    return x + 1  # é\n" * 2
    res = quality.evaluate_text(llama, ByteTokenizer(eos=eos), text, 32, 16)
    assert res.n_bytes == len(text.encode("utf-8"))
    assert res.tokens_scored == res.n_bytes - unscored
    assert res.bits_per_byte == pytest.approx(
        res.nll_per_token * res.tokens_scored / math.log(2) / res.n_bytes)


def test_the_result_records_what_ran(llama):
    res = quality.sliding_window_perplexity(llama, _ids(20), max_length=8, stride=4, label="x")
    row = res.to_dict()
    assert {"label", "model_class", "device", "dtype", "profile", "mamba_path", "torch_version",
            "transformers_version", "nll_per_token", "perplexity", "bits_per_token",
            "tokens_scored", "windows", "max_length", "stride", "n_bytes",
            "bits_per_byte"} == set(row)
    assert (row["model_class"], row["device"], row["dtype"], row["mamba_path"]) == (
        "LlamaForCausalLM", "cpu", "float32", "n/a")


# --- the lab's call and the zoo's call --------------------------------------------------------


def test_the_lab_and_the_zoo_compute_the_same_bits_per_byte():
    from effarch import models

    model, tok = models.load_model("tiny-moe", device="cpu")
    text = data.corpus_text("validation")[:3000]
    lab = quality.evaluate_text(model, tok, text, 64, 48)             # a lab's call
    zoo_res = zoo.score_text(model, tok, text, window=64, stride=48,  # train_zoo's and
                             batch_size=8, capture_routes=True)       # eval_zoo's call
    assert zoo_res.bits_per_byte == pytest.approx(lab.bits_per_byte, rel=1e-6)
    assert zoo_res.tokens_scored == lab.tokens_scored == len(tok(text)["input_ids"])
    # lab 2.4.1 composes the same figure from the scorer and bits_per_byte
    ids = quality.text_ids(tok, text)
    part_d = quality.sliding_window_perplexity(model, ids, max_length=64, stride=48)
    by_hand = quality.bits_per_byte(part_d.nll_per_token, part_d.tokens_scored,
                                    len(text.encode("utf-8")))
    assert by_hand == pytest.approx(lab.bits_per_byte, rel=1e-9)
    # and the guide's loop, written independently, gives it too
    nll, count, _ = _reference_nll(model, ids, 64, 48)
    assert lab.bits_per_byte == pytest.approx(nll * count / math.log(2) / len(text.encode()),
                                              rel=1e-5)
    assert zoo.validation_summary(zoo_res)["bits_per_byte"] == zoo_res.bits_per_byte
