"""ModelConfig from HF config.json: defaults per model_type, both rope spellings, errors naming the field."""

import json

import pytest

from moela.config import DEFAULT_MODEL_DIR, ModelConfig
from moela.errors import ConfigError

V3 = dict(model_type="deepseek_v3", vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
          num_hidden_layers=4, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
          qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4,
          first_k_dense_replace=1, n_group=4, topk_group=2, eos_token_id=[1, 2])


def test_v3_defaults_and_eos_list():
    cfg = ModelConfig.from_dict(V3)
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor) == ("noaux_tc", "sigmoid", True, 2.5)
    assert cfg.eos_token_ids == (1, 2) and cfg.rope_interleave and cfg.latent_dim == 40 and cfg.qk_head_dim == 24


def test_v2_defaults_and_null_q_lora():
    cfg = ModelConfig.from_dict({**V3, "model_type": "deepseek_v2", "q_lora_rank": None, "n_group": None,
                                 "topk_group": None, "eos_token_id": 2})
    assert cfg.q_lora_rank is None and cfg.topk_method == "greedy" and cfg.scoring_func == "softmax"
    assert cfg.eos_token_ids == (2,) and not cfg.norm_topk_prob


def test_kimi_k2_is_v3_architecture_and_auto_map_ignored():
    cfg = ModelConfig.from_dict({**V3, "model_type": "kimi_k2", "n_group": 1, "topk_group": 1,
                                 "auto_map": {"AutoModel": "modeling_deepseek.DeepseekV3Model"}})
    assert cfg.topk_method == "noaux_tc" and cfg.n_group == 1


YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)
REAL_HEADS = dict(qk_nope_head_dim=128, qk_rope_head_dim=64)  # 192-dim query/key heads


def test_rope_scaling_and_rope_parameters_spellings_agree():
    v3 = {**V3, **REAL_HEADS, "max_position_embeddings": 163840}
    old = ModelConfig.from_dict({**v3, "rope_theta": 10000, "rope_scaling": YARN})
    new = ModelConfig.from_dict({**v3,
                                 "rope_parameters": {**YARN, "rope_type": "yarn", "rope_theta": 10000}})
    assert old.rope == new.rope and old.rope.rope_type == "yarn" and old.rope.factor == 40
    assert abs(old.softmax_scale - 0.135234) < 1e-6  # DeepSeek-V3: 192^-0.5 * (0.1 ln 40 + 1)^2


def test_deepseek_v2_softmax_scale():
    cfg = ModelConfig.from_dict({**V3, **REAL_HEADS, "model_type": "deepseek_v2", "rope_scaling": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}})
    assert abs(cfg.softmax_scale - 0.114721) < 1e-6


def test_quantization_config():
    cfg = ModelConfig.from_dict({**V3, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}})
    assert cfg.quantization.weight_block_size == (128, 128)
    with pytest.raises(ConfigError, match="'quantization_config.quant_method' = 'gptq'"):
        ModelConfig.from_dict({**V3, "quantization_config": {"quant_method": "gptq"}})


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "'model_type' = 'llama' is not supported"),
    ({"model_type": None}, "'model_type' = None is not supported"),
    ({"n_group": 3}, "'n_group' = 3 must divide n_routed_experts=16"),
    ({"topk_group": 5}, r"'topk_group' = 5 must be within \[1, n_group=4\]"),
    ({"num_experts_per_tok": 17}, "'num_experts_per_tok' = 17 exceeds n_routed_experts=16"),
    ({"topk_method": "random"}, "'topk_method' = 'random' is not one of"),
    ({"scoring_func": "relu"}, "'scoring_func' = 'relu' is not one of"),
    ({"hidden_size": -4}, "'hidden_size' = -4 must be a positive integer"),
    ({"hidden_size": "big"}, "'hidden_size' = 'big' must be a positive integer"),
    ({"qk_rope_head_dim": 7}, "'qk_rope_head_dim' = 7 must be even"),
    ({"first_k_dense_replace": 9}, "'first_k_dense_replace' = 9 must be within"),
    ({"moe_layer_freq": 2}, "'moe_layer_freq' = 2 is not supported"),
    ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'rope_scaling.type' = 'dynamic' is not supported"),
    ({"eos_token_id": 5000}, "= 5000 is outside the vocabulary"),
])
def test_bad_values_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({**V3, **change})


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**V3, "n_group": 3}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'n_group' = 3"):
        ModelConfig.from_pretrained(tmp_path)


def test_auto_map_is_ignored_not_run(tmp_path):
    raw = dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()),
               auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "modeling_deepseek.py").write_text("raise SystemExit('remote code ran')\n")
    assert ModelConfig.from_pretrained(tmp_path).model_type == "deepseek_v3"


def test_model_dir_errors_name_the_path_and_what_to_do(tmp_path):
    from moela.config import model_dir

    assert model_dir(None) == DEFAULT_MODEL_DIR and model_dir(tmp_path) == tmp_path
    with pytest.raises(ConfigError, match="nope: no such model directory$"):
        model_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="org/name: no such model directory \\(moela reads local directories only"):
        model_dir("org/name")


def test_engine_quantization_names():
    from moela.engine.config import EngineConfig

    assert EngineConfig(quantization="int4").quant_format == "int4-g128"
    assert EngineConfig(quantization="int8").quant_format == "int8" and EngineConfig().quant_format is None
    with pytest.raises(ValueError, match="quantization = 'int3' is invalid: must be None or one of int8, int4"):
        EngineConfig(quantization="int3")


def test_every_engine_flag_reaches_the_engine_config():
    """A flag add_engine_args adds but engine_args drops would be parsed and then silently ignored."""
    import argparse
    from dataclasses import fields

    from moela.engine.config import EngineConfig, add_engine_args, engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--quantization", "int8", "--backend", "reference", "--tensor-parallel-size", "2"])
    passed = engine_args(args)
    assert set(passed) == {a.dest for a in parser._actions if a.dest != "help"}
    assert set(passed) <= {f.name for f in fields(EngineConfig)}
    assert (passed["quantization"], passed["backend"], passed["tensor_parallel_size"]) == ("int8", "reference", 2)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch, native):
    """An AVX2-only CPU runs torch's bf16 GEMMs in scalar code and cannot pack bf16 weights for oneDNN:
    there "auto" is float32 and the cpu backend says why it cannot run."""
    import torch

    from moela import ops
    from moela.config import resolve_dtype
    from moela.engine.config import EngineConfig

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert EngineConfig().torch_dtype == resolve_dtype("auto", cpu)
    assert resolve_dtype("bf16", cpu) == EngineConfig(dtype="bfloat16").torch_dtype == torch.bfloat16
    reason = ops.why_unavailable("cpu", cpu, torch.bfloat16)
    if torch.backends.mkldnn.is_available():
        assert (reason is None) == native
        assert native or "no bf16 instructions" in reason
