"""`moela convert`: DeepSeek-V2/V3/V3.2-architecture checkpoints between HF safetensors names and the MCore
names MindSpore Transformers (mindformers) loads, both ways; HF -> mindformers -> HF gives back every
tensor bit for bit.

    moela convert --to mindformers ./DeepSeek-V3 ./DeepSeek-V3-ms      # HF safetensors -> mindformers
    moela convert --to hf ./DeepSeek-V3-ms ./DeepSeek-V3-hf            # and back

| HF (inside model.layers.N.) | mindformers (inside decoder.layers.N.) |
|---|---|
| input_layernorm, post_attention_layernorm | input_layernorm, pre_mlp_layernorm |
| self_attn.q_a_proj, q_a_layernorm, q_b_proj (q_proj without a query LoRA) | self_attention.linear_q_down_proj, q_layernorm, linear_q_up_proj (linear_q_proj) |
| self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj | self_attention.linear_kv_down_proj, kv_layernorm, linear_kv_up_proj, linear_proj |
| mlp.gate_proj + up_proj, down_proj (dense layers, shared experts) | mlp.linear_fc1 (gate and up rows interleaved), linear_fc2 |
| mlp.gate.weight, mlp.gate.e_score_correction_bias | mlp.router.weight, mlp.router.expert_bias (fp32) |
| mlp.experts.E.gate_proj + up_proj, down_proj | mlp.experts.weight1 [E*hidden, 2*inter] (expert e: [gate; up]^T), weight2 [E*inter, hidden] |
| self_attn.indexer.wq_b, wk, k_norm, weights_proj (V3.2) | self_attention.core_attention.indexer.linear_wq_b, linear_wk, k_norm, linear_weights_proj |

model.embed_tokens, model.norm and lm_head are embedding.word_embeddings, decoder.final_layernorm and
output_layer. A multi-token-prediction layer (HF layer num_hidden_layers + K) becomes mtp.layers.K:
enorm, hnorm, eh_proj, shared_head.norm -> final_layernorm, its block under transformer_layer; its
copies of the embedding and head are dropped (mindformers shares the model's) and restored going back.
FP8 weights are dequantized on the way to mindformers (it has no FP8). Each layer goes to a file of
its own (the checkpoint is read one layer at a time), with an index: model.safetensors.index.json for
HF, param_name_map.json for mindformers; config.json and the tokenizer files are copied.
"""

import argparse
import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moela.config import HelpFormatter, ModelConfig
from moela.errors import CheckpointError, MoelaError
from moela.loader import checkpoint_files, dequantize_fp8
from moela.tokenizer import TOKENIZER_FILES

CONVERTIBLE = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32")
TOP = {"model.embed_tokens.weight": "embedding.word_embeddings.weight", "model.norm.weight": "decoder.final_layernorm.weight",
       "lm_head.weight": "output_layer.weight"}
LAYER = {  # plain renames inside a layer: HF -> mindformers
    "input_layernorm.weight": "input_layernorm.weight", "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight",
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight", "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.gate.weight": "mlp.router.weight", "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "final_layernorm.weight",
    **{f"self_attn.indexer.{hf}": f"self_attention.core_attention.indexer.{ms}"  # V3.2's lightning indexer
       for hf, ms in (("wq_b.weight", "linear_wq_b.weight"), ("wk.weight", "linear_wk.weight"), ("k_norm.weight", "k_norm.weight"),
                      ("k_norm.bias", "k_norm.bias"), ("weights_proj.weight", "linear_weights_proj.weight"))},
}
FUSED = {"mlp.": "mlp.linear_fc1.weight", "mlp.shared_experts.": "mlp.shared_experts.linear_fc1.weight"}  # gate + up
MTP_ONLY = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")  # outside transformer_layer
MTP_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
HF_LAYER, MS_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)"), re.compile(r"(?:decoder|mtp)\.layers\.(\d+)\.(.+)")


def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[I, H] gate and up rows -> [2I, H] with rows g0, u0, g1, u1, ... (mindformers' linear_fc1)."""
    return torch.stack([gate, up], dim=1).flatten(0, 1)


def layer_to_mindformers(layer: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """One HF layer's tensors (names after model.layers.N.) -> mindformers names (after the layer prefix)."""
    check_known(layer, set(LAYER) | {p + w for p in FUSED for w in ("gate_proj.weight", "up_proj.weight")}, r"mlp\.experts\..+")
    out = {LAYER[name]: t for name, t in layer.items() if name in LAYER}
    for prefix, fused in FUSED.items():
        if prefix + "gate_proj.weight" in layer:
            out[fused] = interleave(layer[prefix + "gate_proj.weight"], layer[prefix + "up_proj.weight"])
    if "mlp.gate.weight" in layer:
        if "mlp.experts.gate_up_proj" in layer:  # transformers' fused layout: [E, 2I, H], [E, H, I]
            w13, w2 = layer["mlp.experts.gate_up_proj"], layer["mlp.experts.down_proj"]
        else:
            expert = lambda e, w: layer[f"mlp.experts.{e}.{w}.weight"]  # noqa: E731
            w13 = torch.stack([torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in range(n_experts)])
            w2 = torch.stack([expert(e, "down_proj") for e in range(n_experts)])
        out["mlp.experts.weight1"] = w13.transpose(1, 2).flatten(0, 1)  # [E*H, 2I]
        out["mlp.experts.weight2"] = w2.transpose(1, 2).flatten(0, 1)  # [E*I, H]
    return out


def layer_to_hf(layer: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of layer_to_mindformers: per-expert HF tensors, as DeepSeek's checkpoints hold them."""
    back = {ms: hf for hf, ms in LAYER.items()}
    check_known(layer, set(back) | set(FUSED.values()) | {"mlp.experts.weight1", "mlp.experts.weight2"})
    out = {back[name]: t for name, t in layer.items() if name in back}
    for prefix, fused in FUSED.items():
        if fused in layer:
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = layer[fused][0::2], layer[fused][1::2]
    if "mlp.experts.weight1" in layer:
        w13 = layer["mlp.experts.weight1"].unflatten(0, (n_experts, -1)).transpose(1, 2)  # [E, 2I, H]
        w2 = layer["mlp.experts.weight2"].unflatten(0, (n_experts, -1)).transpose(1, 2)  # [E, H, I]
        for e in range(n_experts):
            gate, up = w13[e].chunk(2)
            out |= {f"mlp.experts.{e}.gate_proj.weight": gate, f"mlp.experts.{e}.up_proj.weight": up,
                    f"mlp.experts.{e}.down_proj.weight": w2[e]}
    return out


def check_known(layer: dict, known: set[str], pattern: str = "$^") -> None:
    unknown = sorted(name for name in layer if name not in known and not re.fullmatch(pattern, name))
    if unknown:
        raise KeyError(unknown[0])


def read(name: str, where: dict[str, Path], to: str, cfg: ModelConfig) -> torch.Tensor:
    """One source tensor as stored; FP8 dequantized to bfloat16 on the way to mindformers."""
    with safe_open(str(where[name]), framework="pt") as f:
        tensor = f.get_tensor(name)
    if tensor.dtype == torch.float8_e4m3fn and to == "mindformers":
        block = cfg.quantization.weight_block_size if cfg.quantization else (128, 128)
        tensor = dequantize_fp8(tensor, read(name + "_scale_inv", where, to, cfg), block, f"{where[name]}: tensor '{name}'")
        tensor = tensor.to(torch.bfloat16)
    return tensor


def layer_of(name: str, to: str, n_layers: int) -> int | None:
    """The layer a source tensor belongs to (MTP layers after the model's), None for the top-level ones."""
    m = (HF_LAYER if to == "mindformers" else MS_LAYER).fullmatch(name)
    if m is None:
        return None
    return int(m[1]) + (n_layers if name.startswith("mtp.") else 0)


def source_files(src: Path, to: str) -> dict[str, Path]:
    """{tensor name: file} of the checkpoint to convert (HF's index or single file; mindformers' param_name_map.json
    or every *.safetensors file in src)."""
    if to == "mindformers":
        return checkpoint_files(src)
    index = src / "param_name_map.json"
    if index.is_file():
        return {name: src / file for name, file in json.loads(index.read_text(encoding="utf-8")).items()}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors files (a mindformers checkpoint directory?)")
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            where |= {name: file for name in f.keys()}
    return where


def convert_layer(tensors: dict[str, torch.Tensor], layer: int | None, to: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's (or the top level's) source tensors, full names -> destination tensors, full names."""
    n = cfg.num_hidden_layers
    if layer is None:
        names = TOP if to == "mindformers" else {ms: hf for hf, ms in TOP.items()}
        return {names[name]: t for name, t in tensors.items()}
    if to == "mindformers":
        inner = {name.split(".", 3)[3]: t for name, t in tensors.items()}  # model.layers.N.<inner>
        converted = layer_to_mindformers({k: v for k, v in inner.items() if k not in MTP_SHARED}, cfg.n_routed_experts)
        if layer < n:
            return {f"decoder.layers.{layer}.{name}": t for name, t in converted.items()}
        mtp_only = {LAYER[name] for name in MTP_ONLY}
        return {f"mtp.layers.{layer - n}.{'' if name in mtp_only else 'transformer_layer.'}{name}": t
                for name, t in converted.items()}
    prefix = f"mtp.layers.{layer - n}." if layer >= n else f"decoder.layers.{layer}."
    inner = {name.removeprefix(prefix).removeprefix("transformer_layer."): t for name, t in tensors.items()}
    return {f"model.layers.{layer}.{name}": t for name, t in layer_to_hf(inner, cfg.n_routed_experts).items()}


def mtp_shared(tensors: dict[str, torch.Tensor], layer: int, to: str, where: dict[str, Path], cfg: ModelConfig) -> dict:
    """An MTP layer's copies of the embedding and head: mindformers shares the model's, so they are dropped
    on the way there (if equal to the model's) and restored on the way back."""
    restored = {}
    for inner, top in MTP_SHARED.items():
        name, model_name = f"model.layers.{layer}.{inner}", top if to == "mindformers" else TOP[top]
        if to == "hf":
            restored[name] = read(model_name, where, to, cfg)
        elif name in tensors and not torch.equal(tensors[name], read(model_name, where, to, cfg)):
            raise CheckpointError(f"{where[name]}: tensor '{name}' differs from '{top}' (mindformers keeps one shared copy)")
    return restored


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Convert the checkpoint in src to dst, one destination file per layer; returns dst."""
    if to not in ("mindformers", "hf"):
        raise ValueError(f"--to {to!r} is invalid: must be mindformers or hf")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    cfg = ModelConfig.from_pretrained(src)
    if cfg.model_type not in CONVERTIBLE:
        raise CheckpointError(f"{src}: model_type {cfg.model_type!r} has no mindformers name table here (convertible: "
                              f"{', '.join(CONVERTIBLE)})")
    where = source_files(src, to)
    groups: dict[int | None, list[str]] = defaultdict(list)
    for name in where:
        if not name.endswith("_scale_inv"):
            groups[layer_of(name, to, cfg.num_hidden_layers)].append(name)
    dst.mkdir(parents=True, exist_ok=True)
    stem, index = "ms-model" if to == "mindformers" else "model", {}
    order = sorted(groups, key=lambda k: -1 if k is None else k)
    for i, layer in enumerate(order):
        tensors = {name: read(name, where, to, cfg) for name in groups[layer]}
        try:
            converted = convert_layer(tensors, layer, to, cfg)
        except KeyError as e:
            raise CheckpointError(f"{src}: layer {layer}: tensor {e} is missing or unexpected for this config") from None
        if layer is not None and layer >= cfg.num_hidden_layers:
            converted |= mtp_shared(tensors, layer, to, where, cfg)
        file = f"{stem}-{i + 1:05d}-of-{len(order):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in converted.items()}, str(dst / file), metadata={"format": "pt"})
        index |= {name: file for name in converted}
    if to == "mindformers":
        (dst / "param_name_map.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    else:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2) + "\n",
                                                          encoding="utf-8")
    for file in ("config.json", *TOKENIZER_FILES):
        if (src / file).is_file():
            shutil.copy2(src / file, dst / file)
    return dst


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moela convert", formatter_class=HelpFormatter,
                                description="Convert a DeepSeek-V2/V3/V3.2-architecture checkpoint between HF safetensors names "
                                            "and mindformers' MCore names (one file per layer, with an index).")
    p.add_argument("--to", required=True, choices=("mindformers", "hf"), help="the naming to write")
    p.add_argument("src", help="checkpoint directory to read (with its config.json)")
    p.add_argument("dst", help="directory to write")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.to)
    except (MoelaError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.to} names)")
    return 0
