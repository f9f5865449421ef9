"""What a quantiser really replaces, against effarch's estimate of it (meta-device builds).

bitsandbytes replaces ``nn.Linear`` layers only; in transformers 5 an MoE's experts are fused
3-D parameters, so 8- and 4-bit leave them in bf16 and an MoE shrinks little. The estimate
(``effarch.memory.quantized_footprint``) must select the same modules as transformers' own
quantizers, on the installed transformers (5.17 on the GPU machine, 5.24 here).
"""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, FineGrainedFP8Config
from transformers.quantizers.auto import AutoHfQuantizer

from effarch import memory, models, moe

REAL_SIZE = [n for n, s in models.REGISTRY.items() if s.config]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed")


def _transformers_selection(cfg, quantization, skip=None):
    """(meta model after transformers' quantizer replaced its modules, replaced module names)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    qcfg = {"8bit": lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip),
            "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip),
            "fp8": lambda: FineGrainedFP8Config(modules_to_not_convert=skip)}[quantization]()
    quantizer = AutoHfQuantizer.from_config(qcfg)
    quantizer._process_model_before_weight_loading(model, device_map={"": "cuda"},
                                                   keep_in_fp32_modules=[])
    kinds = ("Linear8bitLt", "Linear4bit", "FP8Linear", "FP8Experts")
    names = [n for n, m in model.named_modules()
             if any(c.__name__ in kinds for c in type(m).__mro__)]
    return model, sorted(names)


@needs_bnb
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
@pytest.mark.parametrize("name", REAL_SIZE)
def test_bitsandbytes_replaces_what_the_estimate_says(name, quantization):
    cfg, skip = models.get_config(name), list(models.get_spec(name).skip_quantization) or None
    _, replaced = _transformers_selection(cfg, quantization, skip)
    fp = memory.quantized_footprint(cfg, quantization, skip_modules=skip)
    assert sorted(fp.quantized_modules) == replaced


@needs_bnb
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v2", "jamba"])
def test_bitsandbytes_leaves_fused_experts_alone(family):
    cfg = moe.small_config(family)
    model, replaced = _transformers_selection(cfg, "4bit")
    experts = [n for n, m in model.named_modules() if n.endswith(".experts")]
    assert experts and not set(experts) & set(replaced)
    assert all(p.dtype == torch.bfloat16 for n in experts
               for p in model.get_submodule(n).parameters())


@pytest.mark.parametrize("name", REAL_SIZE)
def test_fp8_estimate_is_the_bytes_of_transformers_fp8_module_tree(name):
    cfg = models.get_config(name)
    model, replaced = _transformers_selection(cfg, "fp8")
    fp = memory.quantized_footprint(cfg, "fp8")
    assert sorted(fp.quantized_modules) == replaced
    assert fp.total_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


def test_moe_4bit_keeps_its_experts_in_bf16():
    """Mixtral: 4-bit saves only what sits in Linear layers (attention); the old estimate,
    which shrank every non-embedding weight, said 26.6 GB where ~91.5 GB loads."""
    bf16 = memory.estimate_weights_bytes("mixtral-8x7b")
    q4 = memory.quantized_footprint(models.get_config("mixtral-8x7b"), "4bit")
    pc = memory.count_params(models.get_config("mixtral-8x7b"))
    assert q4.expert_params == pc.routed_experts and q4.expert_bytes == 2 * pc.routed_experts
    assert 0.97 < q4.total_bytes / bf16 < 0.99 and q4.quantized_share < 0.03
    assert memory.estimate_weights_bytes("mixtral-8x7b", quantization="4bit") == q4.total_bytes


def test_dense_model_shrinks_as_expected():
    bf16 = memory.estimate_weights_bytes("phi-2")
    q8 = memory.estimate_weights_bytes("phi-2", quantization="8bit")
    q4 = memory.estimate_weights_bytes("phi-2", quantization="4bit")
    assert 0.5 < q8 / bf16 < 0.6 and 0.3 < q4 / bf16 < 0.4


def test_quantised_bytes_count_scales():
    # 8-bit: int8 weights + a float32 scale per output row; 4-bit NF4: half a byte a weight +
    # a float32 absmax per 64 weights; fp8: a byte a weight + a float32 scale per 128x128 block
    assert memory._quantized_bytes((256, 512), "8bit", 256) == 256 * 512 + 4 * 256
    assert memory._quantized_bytes((256, 512), "4bit", 256) == 256 * 512 // 2 + 4 * 256 * 512 // 64 + 64
    assert memory._quantized_bytes((4, 256, 200), "fp8", 256) == 4 * 256 * 200 + 4 * 4 * 2 * 2


def test_skip_patterns_match_as_transformers_matches_them():
    from transformers.quantizers.quantizers_utils import should_convert_module

    jamba = list(models.get_spec("jamba-v0.1").skip_quantization)
    assert not should_convert_module("model.layers.0.mamba.in_proj", jamba)
    assert not should_convert_module("lm_head", jamba)
    assert should_convert_module("model.layers.4.self_attn.q_proj", jamba)
    # the model card's "mamba" no longer matches in transformers 5: it would quantise them
    assert should_convert_module("model.layers.0.mamba.in_proj", ["mamba"])
    assert re.fullmatch(r"model\.layers\.\d+\.mamba", "model.layers.12.mamba")


def test_estimate_without_a_name_uses_transformers_default_skips():
    cfg = models.get_config("olmoe-1b-7b")
    fp = memory.quantized_footprint(cfg, "8bit")
    assert fp.skip_modules == ("lm_head",) and "lm_head" not in fp.quantized_modules


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of"):
        memory.quantized_footprint(models.get_config("olmoe-1b-7b"), "3bit")


def test_probe_script_smoke_on_the_cpu(tmp_path):
    """The probe's parts that need no GPU: the selection, the save, a bf16 reload and its
    figures (quantised modes are skipped with a reason on the CPU)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(root / "scripts" / "probe_quantization.py"),
                          "--device", "cpu", "--small", "--modes", "bf16,4bit,fp8",
                          "--out", str(tmp_path), "--json", str(tmp_path / "probe.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4bit: transformers replaces" in out.stdout and "experts" in out.stdout
    assert "4bit: skipped — quantised loading needs a CUDA GPU" in out.stdout
    probe = json.loads((tmp_path / "probe.json").read_text())
    (row,) = probe["rows"]
    assert row["mode"] == "bf16" and "forward_ms" in row
    assert sum(g["bytes"] for g in row["groups"]) == row["estimate"] <= row["footprint"]  # + buffers
    assert {g["module_type"] for g in row["groups"]} >= {"OlmoeExperts", "Linear"}
    assert not (tmp_path / "checkpoint").exists()  # the checkpoint is removed after the run


def test_the_guard_does_not_tell_an_moe_that_4bit_will_fit(monkeypatch):
    monkeypatch.setattr(memory, "available",
                        lambda device=None: memory.MemoryInfo(2**20, 2**30, "cpu", "test"))
    with pytest.raises(memory.InsufficientMemoryError) as moe_err:
        models.load_model("mixtral-8x7b", weights="random", device="cpu", dtype="bfloat16")
    assert "4-bit would still need 85.2 GiB" in str(moe_err.value)
    assert "bitsandbytes on MoE experts" in str(moe_err.value)
    with pytest.raises(memory.InsufficientMemoryError) as dense_err:
        models.load_model("mamba-130m", weights="random", device="cpu")
    assert "quantise it" in str(dense_err.value)


@needs_bnb
def test_bitsandbytes_parametrize_quantises_fused_experts_as_estimated():
    """bitsandbytes' experimental replace_parameter_4bit does shrink the fused experts (on the
    CPU too); the estimate's experts part is the bytes it leaves, scales and code included."""
    torch.manual_seed(0)
    cfg = moe.small_config("olmoe")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    assert moe.quantize_experts_4bit(model) == 2 * cfg.num_hidden_layers
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    assert (after - before).abs().max() < 0.1 * before.abs().max()
    groups = {g.module_type: g for g in memory.weights_by_module_type(model)}
    packed = groups["OlmoeExperts (4-bit, parametrized)"]
    assert packed.dtypes == ("uint8",) and "OlmoeExperts" not in groups
    fp = memory.quantized_footprint(cfg, "4bit+experts")
    assert packed.bytes + packed.scale_bytes == fp.expert_bytes
    assert fp.expert_bytes < 0.3 * memory.quantized_footprint(cfg, "4bit").expert_bytes
