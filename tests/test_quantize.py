"""quantize.prepare: weights into a backend's layout, every layer bound to its ops."""

import pytest
import torch

from moela import ops, quantize
from moela.loader import load_model
from moela.models.layers import OpsModule

CPU = torch.device("cpu")


def test_reference_keeps_parameters_and_binds_every_layer(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    model = load_model(path, dtype=torch.float32)
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantize.prepare(model, ops.REFERENCE)
    assert all(m.ops is ops.REFERENCE for m in model.modules() if isinstance(m, OpsModule))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert model.layers[1].ffn.gate.weight.dtype == torch.float32 and model.layers[0].attn.wq_a.weight.requires_grad


@pytest.mark.skipif(ops.why_unavailable("cpu", CPU, torch.bfloat16) is not None, reason="no oneDNN bf16 here")
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
