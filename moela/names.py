"""Checkpoint tensor names: transformers' and DeepSeek's, mapped to moela's parameters and back. The
only place they appear.

    map_name("model.layers.3.self_attn.q_a_proj.weight")   # ("layers.3.attn.wq_a.weight", None, None)
    v4_target("layers.3.ffn.experts.7.w3.weight")          # ("layers.3.ffn.experts.w13", 7, 1)
    to_hf(model.state_dict())                              # V2/V3 state dict with HF names, for saving

A target is (our parameter, expert index or None, gate/up half or None): per-expert tensors fill one
row of the stacked experts, and gate/up halves one half of a fused w13.
"""

import re

import torch

from moela.config import ModelConfig

_INDEXER = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")
# HF name (inside model.layers.N.) -> (our name, which half of a fused gate/up matrix or None)
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "self_attn.q_proj.weight": ("attn.wq.weight", None),
    "self_attn.q_a_proj.weight": ("attn.wq_a.weight", None),
    "self_attn.q_a_layernorm.weight": ("attn.q_norm.weight", None),
    "self_attn.q_b_proj.weight": ("attn.wq_b.weight", None),
    "self_attn.kv_a_proj_with_mqa.weight": ("attn.wkv_a.weight", None),
    "self_attn.kv_a_layernorm.weight": ("attn.kv_norm.weight", None),
    "self_attn.kv_b_proj.weight": ("attn.wkv_b.weight", None),
    "self_attn.o_proj.weight": ("attn.wo.weight", None),
    "mlp.gate_proj.weight": ("ffn.w13.weight", 0),
    "mlp.up_proj.weight": ("ffn.w13.weight", 1),
    "mlp.down_proj.weight": ("ffn.w2.weight", None),
    "mlp.gate.weight": ("ffn.gate.weight", None),
    "mlp.gate.e_score_correction_bias": ("ffn.gate.bias", None),
    "mlp.shared_experts.gate_proj.weight": ("ffn.shared_experts.w13.weight", 0),
    "mlp.shared_experts.up_proj.weight": ("ffn.shared_experts.w13.weight", 1),
    "mlp.shared_experts.down_proj.weight": ("ffn.shared_experts.w2.weight", None),
    "mlp.experts.gate_up_proj": ("ffn.experts.w13", None),  # transformers' fused layout
    "mlp.experts.down_proj": ("ffn.experts.w2", None),
    **{f"self_attn.indexer.{name}": (f"attn.indexer.{name}", None) for name in _INDEXER},  # V3.2
}
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}


def map_name(hf_name: str) -> tuple[str, int | None, int | None] | None:
    """HF tensor name -> (our parameter, expert index or None, gate/up half or None); None if unknown."""
    if hf_name in _TOP:
        return _TOP[hf_name], None, None
    m = LAYER_RE.fullmatch(hf_name)
    if not m:
        return None
    prefix, rest = f"layers.{m[1]}.", m[2]
    if e := _EXPERT.fullmatch(rest):
        proj = e[2]
        name = "ffn.experts.w2" if proj == "down_proj" else "ffn.experts.w13"
        return prefix + name, int(e[1]), (None if proj == "down_proj" else int(proj == "up_proj"))
    if rest in _LAYER_NAMES:
        name, half = _LAYER_NAMES[rest]
        return prefix + name, None, half
    return None


def hf_names(cfg: ModelConfig, fused_experts: bool = False) -> list[str]:
    """Every tensor name a complete checkpoint for cfg holds (MTP layers and FP8 scales aside)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    attn = ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
    attn += ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{a}.weight" for a in attn]
        names += [f"{p}self_attn.indexer.{name}" for name in _INDEXER] if cfg.model_type == "deepseek_v32" else []
        mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        if cfg.is_moe_layer(i):
            mlp = ["mlp.gate"] + [f"mlp.shared_experts.{w}" for w in ("gate_proj", "up_proj", "down_proj") if cfg.n_shared_experts]
            if fused_experts:
                names += [p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"]
            else:
                names += [f"{p}mlp.experts.{e}.{w}.weight" for e in range(cfg.n_routed_experts) for w in ("gate_proj", "up_proj", "down_proj")]
            if cfg.topk_method == "noaux_tc":
                names.append(p + "mlp.gate.e_score_correction_bias")
        names += [f"{p}{m}.weight" for m in mlp]
    return names



# ---- DeepSeek-V4: DeepSeek's own names, transformers' module names, and transformers' saved names ----
# transformers' module names -> DeepSeek's, in order (applied after dropping a leading "model.")
_V4_FROM_HF = [(re.compile(a), b) for a, b in (
    (r"^embed_tokens\.", "embed."), (r"^lm_head\.", "head."), (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"), (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."), (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.sinks$", ".attn_sink"), (r"\.position_bias$", ".ape"), (r"\.q_a_proj\.", ".wq_a."), (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."), (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."), (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."), (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."), (r"\.attn\.norm\.", ".attn.kv_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"))]
_V4_EXPERT = re.compile(r"(layers\.\d+\.ffn\.)(experts\.(\d+)|shared_experts)\.w([123])\.weight")
_V4_HC = re.compile(r"(layers\.\d+\.|)hc_(attn|ffn|head)_(fn|base|scale)")


def v4_target(name: str) -> tuple[str, int | None, int | None]:
    """A V4 checkpoint name in any of the three spellings -> (our parameter, expert, half)."""
    name = name.removeprefix("model.")
    for pattern, repl in _V4_FROM_HF:
        name = pattern.sub(repl, name)
    if m := _V4_HC.fullmatch(name):
        return f"{m[1]}hc_{m[2]}.{m[3]}", None, None
    if m := _V4_EXPERT.fullmatch(name):
        stacked = m[3] is not None
        param = m[1] + ("experts." if stacked else "shared_experts.") + ("w2" if m[4] == "2" else "w13")
        return param + ("" if stacked else ".weight"), int(m[3]) if stacked else None, {"1": 0, "3": 1}.get(m[4])
    if name.endswith(".ffn.experts.gate_up_proj") or name.endswith(".ffn.experts.down_proj"):
        return name.rsplit(".", 1)[0] + (".w13" if name.endswith("gate_up_proj") else ".w2"), None, None
    return name, None, None


# Saving: our parameter names -> HF names, the inverse of the table above. The MTP module (its own
# norms and projection around a full Block) is stored as layer num_hidden_layers, as DeepSeek-V3 does.
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "norm.weight": "shared_head.norm.weight"}


def _inverse_layer_names() -> dict[str, list[tuple[str, int | None]]]:
    """Our name inside a layer -> [(HF name, gate/up half or None)]; experts are split separately."""
    inverse: dict[str, list[tuple[str, int | None]]] = {}
    for hf, (ours, half) in _LAYER_NAMES.items():
        if not hf.startswith("mlp.experts."):
            inverse.setdefault(ours, []).append((hf, half))
    return inverse


_OURS = _inverse_layer_names()


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors: fused gate/up split in halves, stacked experts split per expert."""
    top = {ours: hf for hf, ours in _TOP.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        p = f"model.layers.{layer}."
        if rest == "ffn.experts.w2":
            out.update({f"{p}mlp.experts.{e}.down_proj.weight": w for e, w in enumerate(t)})
        elif rest == "ffn.experts.w13":
            for e, w in enumerate(t):
                gate, up = w.chunk(2)  # [2I, d] -> gate rows, up rows
                out[f"{p}mlp.experts.{e}.gate_proj.weight"], out[f"{p}mlp.experts.{e}.up_proj.weight"] = gate, up
        elif rest in MTP_NAMES:
            out[p + MTP_NAMES[rest]] = t
        else:
            out.update({p + hf: (t if half is None else t.chunk(2)[half]) for hf, half in _OURS[rest]})
    return out


