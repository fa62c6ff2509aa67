"""moela.models: the one builder of an empty model, and what each layer declares it caches."""

import pytest
import torch

from conftest import BASE
from moela.config import ModelConfig
from moela.cost import formulas as cost
from moela.cost.catalog import shape_from_model_config
from moela.models import build_model


def config(**changes) -> ModelConfig:
    return ModelConfig.from_dict(dict(BASE, model_type="deepseek_v3", n_group=4, topk_group=2, **changes))


def test_build_on_meta_and_on_the_cpu():
    cfg = config()
    meta = build_model(cfg, torch.bfloat16, "meta")
    assert meta.embed.weight.device.type == "meta" and meta.embed.weight.dtype == torch.bfloat16
    model = build_model(cfg, torch.bfloat16, "cpu")
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32  # the router bias stays fp32
    assert model.rope.inv_freq.device.type == "cpu" and int(model.layers[1].ffn.experts.load.sum()) == 0
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert sum(p.numel() for p in model.parameters()) == cost.param_counts(shape_from_model_config(cfg)).total


def test_every_mla_layer_caches_its_latent_as_the_cost_model_counts():
    cfg = config()
    specs = build_model(cfg, torch.bfloat16, "meta").cache_specs()
    assert len(specs) == cfg.num_hidden_layers
    assert all([(s.name, s.kind, s.width, s.paged) for s in layer] == [("kv_cache", "latent", 24 + 8, True)] for layer in specs)
    per_token = sum(s.bytes_per_token(torch.bfloat16) for layer in specs for s in layer)
    assert per_token == cost.cache_bytes_per_token(shape_from_model_config(cfg), "bf16")


@pytest.mark.parametrize("variant", ["v32", "v4"])
def test_sparse_models_count_as_the_cost_model_does(variant, hf_checkpoint):
    path, hf = hf_checkpoint(variant)
    cfg = ModelConfig.from_pretrained(path)
    model = build_model(cfg, torch.bfloat16, "meta")
    assert sum(p.numel() for p in model.parameters()) == cost.param_counts(shape_from_model_config(cfg)).total
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    if variant == "v4":  # V4 keeps its norms, sinks, position biases and mHC in fp32 whatever the dtype
        fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
        assert "layers.1.attn.attn_sink" in fp32 and "layers.1.attn.compressor.ape" in fp32 and "hc_head.fn" in fp32
        assert "layers.1.attn_norm.weight" in fp32 and "layers.1.attn.wq_a.weight" not in fp32
