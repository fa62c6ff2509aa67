"""quantize.prepare: weights into a backend's layout, every layer bound to its ops."""

import json
import math
import subprocess
import sys

import pytest
import torch

from moela import ops, quantize
from moela.config import ModelConfig, model_dir
from moela.loader import load_model
from moela.models import StepContext, build_model
from moela.models.layers import Linear, OpsModule

CPU = torch.device("cpu")
cpu_only = pytest.mark.skipif(ops.why_unavailable("cpu", CPU, torch.bfloat16) is not None, reason="no oneDNN bf16 here")


def test_reference_keeps_parameters_and_binds_every_layer(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    model = load_model(path, dtype=torch.float32)
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantize.prepare(model, ops.REFERENCE)
    assert all(m.ops is ops.REFERENCE for m in model.modules() if isinstance(m, OpsModule))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert model.layers[1].ffn.gate.weight.dtype == torch.float32 and model.layers[0].attn.wq_a.weight.requires_grad


@cpu_only
def test_cpu_packs_projections_and_experts_but_not_wkv_b(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    model = load_model(path, dtype=torch.bfloat16)
    backend = ops.select("cpu", CPU, torch.bfloat16)
    quantize.prepare(model, backend)
    attn, moe = model.layers[1].attn, model.layers[1].ffn
    assert attn.wq_a.weight.is_mkldnn and not attn.wkv_b.weight.is_mkldnn and model.head.weight.is_mkldnn
    assert all(w.is_mkldnn for w in moe.experts.w13) and len(moe.experts.w2) == 8
    assert moe.gate.weight.dtype == torch.float32 and attn.ops is backend
    assert not any(p.requires_grad for p in model.parameters())


DEFAULT = model_dir(None)  # the embedded model: every width fits int4 groups, so int4 covers it all


def logits_of(model, lengths=(11, 1, 4)) -> torch.Tensor:
    ctx = StepContext.prefill(list(lengths))
    tokens = torch.randint(2, model.cfg.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.logits(model(tokens, ctx.positions, ctx)).float()


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("name", ["reference", pytest.param("cpu", marks=cpu_only)])
def test_quantize_on_load_equals_quantizing_the_loaded_model(name, fmt):
    """OnLoad packs each tensor as it is read: the same codes as prepare() on the whole loaded model."""
    backend = ops.load(name)
    loaded = load_model(DEFAULT, dtype=torch.bfloat16)
    quantize.prepare(loaded, backend, fmt)
    on_load = load_model(DEFAULT, dtype=torch.bfloat16, hook=quantize.OnLoad(backend, fmt))
    quantize.prepare(on_load, backend, fmt)
    experts = on_load.layers[1].ffn.experts
    assert isinstance(experts.w13, list) and len(experts.w13) == 8 and not isinstance(on_load.head.weight, torch.Tensor)
    assert isinstance(on_load.layers[1].attn.wkv_b.weight, torch.Tensor)  # wkv_b stays plain
    assert torch.equal(logits_of(on_load), logits_of(loaded))
    assert quantize.weight_bytes(on_load) == quantize.weight_bytes(loaded)


def test_quantized_logits_stay_close_to_bf16():
    ref = load_model(DEFAULT, dtype=torch.bfloat16)
    base = logits_of(ref)
    for fmt, bound in (("int8", 0.03), ("int4-g32", 0.25)):  # relative Frobenius error of the logits
        model = load_model(DEFAULT, dtype=torch.bfloat16, hook=quantize.OnLoad(ops.REFERENCE, fmt))
        quantize.prepare(model, ops.REFERENCE, fmt)
        err = ((logits_of(model) - base).norm() / base.norm()).item()
        assert err < bound, (fmt, err)


def test_on_load_never_builds_the_quantized_weights_in_the_model_dtype():
    hook = quantize.OnLoad(ops.REFERENCE, "int8")
    model = build_model(ModelConfig.from_pretrained(DEFAULT), torch.bfloat16, "meta")
    hook.claim(model)
    assert model.head.weight is None and model.layers[1].ffn.experts.w13 == [None] * 8
    left = {n for n, _ in model.named_parameters()}  # what the loader allocates: the embedding, norms, router, wkv_b
    assert left and all(n == "embed.weight" or "norm" in n or "gate.weight" in n or "wkv_b" in n for n in left)
    assert len(hook.slots) == sum(isinstance(m, Linear) and not m.sliced for m in model.modules()) + 2 * 3  # + experts


def test_fp8_checkpoint_quantizes_on_load(tmp_path):
    """FP8 block weights go to int8 codes through fp32, never through the model dtype: the same codes as
    quantizing the fp32-loaded model."""
    from safetensors.torch import load_file, save_file

    from test_loader import quantize_fp8

    tensors = load_file(DEFAULT / "model.safetensors")
    fp8 = {}
    for name, t in tensors.items():
        if t.dim() == 2 and "proj" in name:
            fp8[name], fp8[name + "_scale_inv"] = quantize_fp8(t.float(), (128, 128))
        else:
            fp8[name] = t
    save_file(fp8, tmp_path / "model.safetensors")
    config = json.loads((DEFAULT / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    full = load_model(tmp_path, dtype=torch.float32)
    quantize.prepare(full, ops.REFERENCE, "int8")
    on_load = load_model(tmp_path, dtype=torch.float32, hook=quantize.OnLoad(ops.REFERENCE, "int8"))
    quantize.prepare(on_load, ops.REFERENCE, "int8")
    assert torch.equal(on_load.layers[1].ffn.experts.w13[3].codes, full.layers[1].ffn.experts.w13[3].codes)
    assert torch.equal(logits_of(on_load), logits_of(full))


PEAK_SCRIPT = """
import json, sys, torch
from moela import loader, ops, quantize
from moela.config import ModelConfig
from moela.models import build_model
from moela.ops import cpu

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

backend = ops.select("cpu", torch.device("cpu"), torch.bfloat16)
build_model(ModelConfig.from_pretrained(sys.argv[1]), torch.bfloat16, "meta")  # torch's one-time set-up, before the baseline
cpu.PACK_VALUES, loader.MAP_BYTES = 1 << 18, 1 << 23
base = status("VmRSS:")
model = loader.load_model(sys.argv[1], hook=quantize.OnLoad(backend, "int4-g32"))
print(json.dumps({"base": base, "peak": status("VmHWM:"), "weights": quantize.weight_bytes(model)}))
"""


@cpu_only
def test_quantize_on_load_peak_memory(tmp_path):
    """Peak RSS while loading stays within the quantized model + the largest tensor + the temporaries of
    quantizing and mapping a block (1 MiB of fp32 values, 8 MiB of file here): far below the bf16
    model, which never exists."""
    from moela.cost.measure import random_model
    from moela.loader import read_header, save_model

    config = json.loads((DEFAULT / "config.json").read_text()) | {
        "hidden_size": 1024, "moe_intermediate_size": 1024, "n_routed_experts": 16, "intermediate_size": 2048}
    cfg = ModelConfig.from_dict(config)
    save_model(random_model(cfg), tmp_path, dtype=torch.bfloat16, config=config)
    sizes = [2 * math.prod(shape) for _, shape in read_header(tmp_path / "model.safetensors").values()]
    bf16, largest = sum(sizes), max(sizes)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    grown = r["peak"] - r["base"]
    assert grown < r["weights"] + largest + 24 * 2**20, (grown, r, largest)
    assert grown < bf16 / 2, (grown, bf16)



def test_quantizes_needs_linear_and_moe_that_read_the_packed_weights():
    import dataclasses

    assert ops.quantizes(ops.REFERENCE) and ops.quantizes(ops.load("cpu"))
    assert not ops.quantizes(dataclasses.replace(ops.REFERENCE, linear=lambda x, w: x))  # another module's linear
