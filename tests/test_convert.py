"""`moela convert`: HF <-> mindformers (MCore names) on the tiny V2, V2-Lite, V3 and V3.2 checkpoints, round
trips bit for bit both ways, the mindformers layout itself, an MTP layer, and errors that name the tensor."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moela import cli
from moela.config import ModelConfig
from moela.convert import convert
from moela.errors import CheckpointError
from moela.loader import checkpoint_files, load_model
from moela.models import StepContext


def tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "param_name_map.json"
    where = {n: path / f for n, f in json.loads(index.read_text()).items()} if index.is_file() else checkpoint_files(path)
    out = {}
    for name, file in where.items():
        with safe_open(str(file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("variant", ["v2", "v2_lite", "v3", "v32"])
def test_round_trips_are_exact_both_ways(hf_checkpoint, tmp_path, variant):
    src, _ = hf_checkpoint(variant)
    convert(src, tmp_path / "ms", "mindformers")
    convert(tmp_path / "ms", tmp_path / "hf", "hf")
    assert_identical(tensors(src), tensors(tmp_path / "hf"))
    convert(tmp_path / "hf", tmp_path / "ms2", "mindformers")
    assert_identical(tensors(tmp_path / "ms"), tensors(tmp_path / "ms2"))
    ours, ref = load_model(tmp_path / "hf", torch.float32), load_model(src, torch.float32)  # the sharded result loads
    ctx, tokens = StepContext.prefill([6]), torch.tensor([5, 9, 17, 33, 2, 71])
    with torch.no_grad():
        assert torch.equal(ours.logits(ours(tokens, ctx.positions, ctx)), ref.logits(ref(tokens, ctx.positions, ctx)))


def test_mindformers_layout(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("v3")
    cfg, hf = ModelConfig.from_pretrained(src), tensors(src)
    convert(src, tmp_path, "mindformers")
    ms = tensors(tmp_path)
    H, inter, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    for name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight",
                 "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.self_attention.linear_q_down_proj.weight",
                 "decoder.layers.1.self_attention.linear_kv_up_proj.weight", "decoder.layers.1.pre_mlp_layernorm.weight"):
        assert name in ms, name
    p, q = "model.layers.1.mlp.", "decoder.layers.1.mlp."
    assert ms[q + "experts.weight1"].shape == (E * H, 2 * inter) and ms[q + "experts.weight2"].shape == (E * inter, H)
    gate_up = torch.cat([hf[p + "experts.5.gate_proj.weight"], hf[p + "experts.5.up_proj.weight"]])
    assert torch.equal(ms[q + "experts.weight1"][5 * H : 6 * H], gate_up.T)
    assert torch.equal(ms[q + "experts.weight2"][5 * inter : 6 * inter], hf[p + "experts.5.down_proj.weight"].T)
    fc1 = ms[q + "shared_experts.linear_fc1.weight"]  # gate and up rows interleaved
    assert torch.equal(fc1[0::2], hf[p + "shared_experts.gate_proj.weight"]) and torch.equal(fc1[1::2], hf[p + "shared_experts.up_proj.weight"])
    assert ms[q + "router.expert_bias"].dtype == torch.float32 and torch.equal(ms[q + "router.weight"], hf[p + "gate.weight"])
    assert (tmp_path / "config.json").is_file() and len(json.loads((tmp_path / "param_name_map.json").read_text())) == len(ms)


def test_v32_indexer_names(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("v32")
    hf = tensors(src)
    convert(src, tmp_path, "mindformers")
    ms = tensors(tmp_path)
    p, q = "model.layers.1.self_attn.indexer.", "decoder.layers.1.self_attention.core_attention.indexer."
    for ours, theirs in (("wq_b.weight", "linear_wq_b.weight"), ("wk.weight", "linear_wk.weight"), ("k_norm.weight", "k_norm.weight"),
                         ("k_norm.bias", "k_norm.bias"), ("weights_proj.weight", "linear_weights_proj.weight")):
        assert torch.equal(ms[q + theirs], hf[p + ours]), ours
    assert not any(".indexer." in n and "core_attention" not in n for n in ms)


def test_an_mtp_layer_maps_to_mtp_layers_and_back(hf_checkpoint, tmp_path):
    """DeepSeek-V3 stores its MTP module as layer num_hidden_layers with copies of the embedding and head."""
    src, _ = hf_checkpoint("v3")
    hf = tensors(src)
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in hf.items() if k.startswith("model.layers.2.")}
    mtp |= {f"model.layers.3.{n}.weight": torch.ones(48) for n in ("enorm", "hnorm", "shared_head.norm")}
    mtp |= {"model.layers.3.eh_proj.weight": torch.randn(48, 96, generator=torch.Generator().manual_seed(0)), "model.layers.3.embed_tokens.weight": hf["model.embed_tokens.weight"].clone(),
            "model.layers.3.shared_head.head.weight": hf["lm_head.weight"].clone()}
    model = shutil.copytree(src, tmp_path / "model")
    save_file(hf | mtp, str(model / "model.safetensors"))
    convert(model, tmp_path / "ms", "mindformers")
    ms = tensors(tmp_path / "ms")
    assert "mtp.layers.0.enorm.weight" in ms and "mtp.layers.0.final_layernorm.weight" in ms
    assert "mtp.layers.0.transformer_layer.mlp.experts.weight1" in ms and not any("embed_tokens" in n for n in ms)
    convert(tmp_path / "ms", tmp_path / "hf", "hf")
    assert_identical(hf | mtp, tensors(tmp_path / "hf"))


def test_errors_name_the_tensor(hf_checkpoint, tmp_path, capsys):
    src, _ = hf_checkpoint("v2_lite")
    model = shutil.copytree(src, tmp_path / "model")
    save_file(tensors(src) | {"model.layers.1.mlp.mystery.weight": torch.zeros(2)}, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layer 1: tensor 'mlp.mystery.weight' is missing or unexpected"):
        convert(model, tmp_path / "out", "mindformers")
    assert cli.main(["convert", "--to", "hf", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert cli.main(["convert", "--to", "mindformers", str(hf_checkpoint("v4")[0]), str(tmp_path / "out")]) == 1
    assert "model_type 'deepseek_v4' has no mindformers name table" in capsys.readouterr().err
    assert cli.main(["convert", "--to", "mindformers", str(src), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "param_name_map.json").is_file()
