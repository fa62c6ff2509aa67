"""Catalogs for `moela cost`: public model configs and chip figures shipped as JSON, and this machine.

    from moela.cost.catalog import load_model, load_hardware
    model = load_model("r1")           # CatalogModel(key="deepseek-v3", shape=CostShape(...), ...)
    model = load_model("ckpt/config.json")   # any DeepSeek-V2/V3/V3.2/V4 or Kimi K2 config.json
    h800 = load_hardware("h800")       # Hardware with a source for every figure
    here = load_hardware("local")      # measured now (about a second): copy bandwidth, bf16 matmul rate

Model entries (models.json beside this file) keep HF config.json field names; `shape_from_config`
turns one into the CostShape that moela.cost.formulas computes with. Names match case-insensitively,
with or without the "deepseek-" prefix, or through an entry's aliases. The benchmark shapes
(`bench-1b`, `bench-tiny`) are entries too: `moela bench`, `moela cost --measure` and the tests all
read them from here.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moela.config import ModelConfig
from moela.cost.formulas import CostShape, Hardware

CATALOG = Path(__file__).parent
LOCAL_NAMES = ("local", "cpu")
_V4_LAYER_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


class UnknownEntry(LookupError):
    """A model or chip name the catalog does not hold; the message lists the known ones."""

    def __init__(self, what: str, name: str, known: list[str]):
        super().__init__(f"unknown {what} {name!r}; known: {', '.join(known)}")
        self.known = known


@dataclass(frozen=True)
class CatalogModel:
    key: str
    name: str
    shape: CostShape
    config: dict[str, Any]
    source: str
    published_total: float | None = None
    published_active: float | None = None
    published_source: str = ""


def _read(file: str) -> dict[str, dict]:
    table = json.loads((CATALOG / file).read_text(encoding="utf-8"))
    return {k: v for k, v in table.items() if not k.startswith("_")}


def _find(table: dict[str, dict], name: str) -> str | None:
    name = name.lower()
    for key, entry in table.items():
        if name in (key, key.removeprefix("deepseek-"), *entry.get("aliases", ())):
            return key
    return None


def model_names() -> list[str]:
    return list(_read("models.json"))


def hardware_names() -> list[str]:
    return [*_read("hardware.json"), LOCAL_NAMES[0]]


def load_model(name: str) -> CatalogModel:
    """A catalog entry by name, or a config.json (or a directory holding one) by path."""
    path = Path(name)
    if path.is_dir() or path.suffix == ".json" and path.is_file():
        file = path / "config.json" if path.is_dir() else path
        config = json.loads(file.read_text(encoding="utf-8"))
        return CatalogModel(str(file), str(file), shape_from_config(str(file), config), config, str(file))
    table = _read("models.json")
    key = _find(table, name)
    if key is None:
        raise UnknownEntry("model", name, list(table))
    entry, published = table[key], table[key].get("published", {})
    return CatalogModel(key, entry["name"], shape_from_config(key, entry["config"]), entry["config"],
                        entry["source"], published.get("total"), published.get("active"),
                        published.get("source", ""))


def load_hardware(name: str) -> Hardware:
    if name.lower() in LOCAL_NAMES:
        from moela.cost.measure import measure_local

        return measure_local()
    table = _read("hardware.json")
    key = _find(table, name)
    if key is None:
        raise UnknownEntry("hardware", name, [*table, LOCAL_NAMES[0]])
    entry = table[key]
    tflops = {dtype: fig["value"] for dtype, fig in entry["tflops"].items()}
    sources = {"memory_gb": entry["memory_gb"]["source"], "bandwidth_tbs": entry["bandwidth_tbs"]["source"]}
    sources |= {dtype: fig["source"] for dtype, fig in entry["tflops"].items()}
    return Hardware(entry["name"], entry["memory_gb"]["value"], entry["bandwidth_tbs"]["value"], tflops, sources)


def shape_from_config(name: str, cfg: dict[str, Any]) -> CostShape:
    """A HF config.json dict (deepseek_v2, deepseek_v3, kimi_k2, deepseek_v32, deepseek_v4) as a CostShape."""
    if cfg.get("model_type") == "deepseek_v4":
        return _v4_shape(name, cfg)
    return CostShape(
        name=name, attention="dsa" if cfg.get("model_type") == "deepseek_v32" else "mla",
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
        intermediate_size=cfg["intermediate_size"], moe_intermediate_size=cfg["moe_intermediate_size"],
        n_routed_experts=cfg["n_routed_experts"], n_shared_experts=cfg["n_shared_experts"],
        top_k=cfg["num_experts_per_tok"], n_dense_layers=cfg.get("first_k_dense_replace", 0),
        index_n_heads=cfg.get("index_n_heads", 0), index_head_dim=cfg.get("index_head_dim", 0),
        index_topk=cfg.get("index_topk", 0),
    )


def _v4_layer_counts(cfg: dict[str, Any]) -> Counter:
    """Counts per attention type from the catalog's counts, HF's `layer_types` or the checkpoint's ratios."""
    if "layer_type_counts" in cfg:
        return Counter(cfg["layer_type_counts"])
    n = cfg["num_hidden_layers"]
    if "layer_types" in cfg:
        return Counter(cfg["layer_types"][:n])
    return Counter(_V4_LAYER_TYPES[r] for r in cfg["compress_ratios"][:n])


def _v4_shape(name: str, cfg: dict[str, Any]) -> CostShape:
    counts, rope = _v4_layer_counts(cfg), cfg.get("qk_rope_head_dim", 64)
    rates = cfg.get("compress_rates") or {}
    return CostShape(
        name=name, attention="v4", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=0, qk_nope_head_dim=cfg["head_dim"] - rope,
        qk_rope_head_dim=rope, v_head_dim=cfg["head_dim"], intermediate_size=0,
        moe_intermediate_size=cfg["moe_intermediate_size"], n_routed_experts=cfg["n_routed_experts"],
        n_shared_experts=cfg["n_shared_experts"], top_k=cfg["num_experts_per_tok"], n_dense_layers=0,
        index_n_heads=cfg["index_n_heads"], index_head_dim=cfg["index_head_dim"], index_topk=cfg["index_topk"],
        o_groups=cfg["o_groups"], o_lora_rank=cfg["o_lora_rank"], hc_mult=cfg["hc_mult"],
        sliding_window=cfg["sliding_window"], n_csa_layers=counts["compressed_sparse_attention"],
        n_hca_layers=counts["heavily_compressed_attention"],
        csa_rate=rates.get("compressed_sparse_attention", 4), hca_rate=rates.get("heavily_compressed_attention", 128),
    )


def shape_from_model_config(cfg: ModelConfig, name: str = "model") -> CostShape:
    """The CostShape of a moela ModelConfig (DeepSeek-V2/V3, Kimi K2, V3.2, V4)."""
    ix = cfg.indexer
    index = dict(index_n_heads=ix.n_heads, index_head_dim=ix.head_dim, index_topk=ix.topk) if ix else {}
    if cfg.v4:
        v4 = cfg.v4
        return CostShape(
            name=name, attention="v4", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=0, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=v4.head_dim, intermediate_size=0, moe_intermediate_size=cfg.moe_intermediate_size,
            n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts, top_k=cfg.num_experts_per_tok,
            n_dense_layers=0, o_groups=v4.o_groups, o_lora_rank=v4.o_lora_rank, hc_mult=v4.hc_mult,
            sliding_window=v4.sliding_window, n_csa_layers=v4.layer_types.count("csa"),
            n_hca_layers=v4.layer_types.count("hca"), csa_rate=v4.csa_rate, hca_rate=v4.hca_rate, **index)
    return CostShape(
        name=name, attention="dsa" if ix else "mla", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        top_k=cfg.num_experts_per_tok, n_dense_layers=cfg.first_k_dense_replace, **index,
    )
