import pytest
import torch
from transformers import AutoModelForCausalLM

from effarch import memory, models

REAL_SIZE = [n for n, s in models.REGISTRY.items() if s.config]


@pytest.mark.parametrize("name", REAL_SIZE)
def test_estimate_within_5_percent_of_meta_build(name):
    cfg = models.get_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    est = memory.estimate_weights_bytes(name, "bfloat16")
    assert abs(est / real - 1) < 0.05, (name, est, real)


@pytest.mark.parametrize("name", REAL_SIZE)
def test_configs_match_published_totals(name):
    spec = models.get_spec(name)
    pc = memory.count_params(models.get_config(name))
    assert abs(pc.total / spec.published_params - 1) < 0.02, (name, pc.total)
    if spec.published_active:
        # DeepSeek reports activated parameters without the embedding table.
        assert abs((pc.active - pc.embedding) / spec.published_active - 1) < 0.12, name


def test_moe_active_below_total_and_dense_equal():
    assert memory.count_params(models.get_config("mixtral-8x7b")).active < 0.3e11
    pc = memory.count_params(models.get_config("phi-2"))
    assert pc.active == pc.total


def test_quantised_estimates_shrink():
    # bitsandbytes quantises Linear layers only: Mixtral's fused experts stay bf16
    # (tests/test_quantization.py compares the selection with transformers' quantizers)
    b16 = memory.estimate_weights_bytes("mixtral-8x7b", "bfloat16")
    q8 = memory.estimate_weights_bytes("mixtral-8x7b", "bfloat16", "8bit")
    q4 = memory.estimate_weights_bytes("mixtral-8x7b", "bfloat16", "4bit")
    assert q4 < q8 < b16
    assert 0.97 < q4 / b16 < q8 / b16 < 0.99


def test_dtype_bytes():
    assert memory.dtype_bytes(torch.float32) == 4
    assert memory.dtype_bytes("bf16") == 2
    with pytest.raises(ValueError):
        memory.dtype_bytes("float7")


def test_available_cpu():
    info = memory.available("cpu")
    assert 0 < info.available_bytes <= info.total_bytes
    assert "psutil" in info.source


def test_require_refuses_with_suggestions():
    with pytest.raises(memory.InsufficientMemoryError) as e:
        memory.require(10**15, device="cpu", what="a planet-sized model")
    msg = str(e.value)
    assert "planet-sized" in msg and "quantise" in msg and "force=True" in msg
    assert "TROUBLESHOOTING.md" in msg


def test_require_passes_small():
    assert memory.require(1024, device="cpu").available_bytes > 1024


def test_unified_memory_false_on_cpu():
    assert memory.is_unified_memory("cpu") is False
