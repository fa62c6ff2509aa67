"""Configuration, one dataclass per concern, each validated once: the model (from a HF
`config.json`), the engine, the scheduler; and the one map of dtype names every CLI and API takes.

    cfg = ModelConfig.from_pretrained("path/to/model")   # or ModelConfig.from_dict(json.load(...))
    engine_cfg = EngineConfig(model="path/to/model", dtype="bfloat16", kv_cache_memory="4GiB")
    DTYPES["bf16"] is DTYPES["bfloat16"] is torch.bfloat16

Defaults for fields a config.json leaves out follow the HF config class of its `model_type`, so a
checkpoint saved by transformers means the same thing here. `auto_map` (remote code) is ignored.
"""

import argparse
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from moela.errors import ConfigError
from moela.ops import BACKENDS, load_device

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"  # the embedded default model
RUNTIMES = ("torch", "onnx")  # torch: moela's model and backends; onnx: graphs from `moela export onnx` on ONNX Runtime
PROVIDERS = ("cpu", "cuda", "cann")  # ONNX Runtime's execution providers that runtime "onnx" takes
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "deepseek_v4")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
V4_LAYER_TYPES = {0: "sliding", 4: "csa", 128: "hca", "sliding_attention": "sliding",  # config spellings -> ours
                  "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}
# Every dtype name moela takes, and its bytes per value. The first six (long and short spellings) are
# what weights and caches run in: LLM(dtype=...), EngineConfig, --dtype. fp8, int8 and int4 are
# storage formats that the cost model plans with (`moela cost --dtype`).
DTYPE_TABLE: dict[str, tuple[torch.dtype | None, float]] = {
    "bfloat16": (torch.bfloat16, 2), "float16": (torch.float16, 2), "float32": (torch.float32, 4),
    "bf16": (torch.bfloat16, 2), "fp16": (torch.float16, 2), "fp32": (torch.float32, 4),
    "fp8": (torch.float8_e4m3fn, 1), "int8": (torch.int8, 1), "int4": (None, 0.5)}
DTYPES = {name: dtype for name, (dtype, _) in list(DTYPE_TABLE.items())[:6]}
# Weight-only quantization (LLM(quantization=...), --quantization): name -> format of
# moela.ops.reference.QUANT_FORMATS. int8: one scale per output channel; int4: a scale and a zero
# point per group of input channels.
QUANTIZATIONS = {"int8": "int8", "int4": "int4-g128", "int4-g32": "int4-g32", "int4-g64": "int4-g64",
                 "int4-g128": "int4-g128"}
DTYPE_BYTES = {name: float(size) for name, (_, size) in DTYPE_TABLE.items()}

# Defaults of HF's DeepseekV2Config / DeepseekV3Config for fields a config.json may omit.
_V2_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
    num_hidden_layers=32, num_attention_heads=32, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2,
    n_routed_experts=64, num_experts_per_tok=None, first_k_dense_replace=0, routed_scaling_factor=1.0,
    topk_method="greedy", scoring_func="softmax", n_group=None, topk_group=None, norm_topk_prob=False,
    max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, rope_interleave=True,
)
_V3_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=1,
    n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, routed_scaling_factor=2.5,
    topk_method="noaux_tc", scoring_func="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True,
    max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, rope_interleave=True,
)


def model_dir(name: str | Path | None) -> Path:
    """The model directory `name` (None: the embedded default model), or an error that says what to do."""
    if name is None:
        return DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    hint = ""
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        hint = (f" (moela reads local directories only: download the checkpoint first, for example with "
                f"`huggingface-cli download {name} --local-dir {Path(name).name}`, and pass that directory)")
    raise ConfigError(f"{name}: no such model directory{hint}")


_V32_DEFAULTS = dict(_V3_DEFAULTS, max_position_embeddings=163840, index_n_heads=64, index_head_dim=128,
                    index_topk=2048)
_V4_DEFAULTS = dict(  # DeepSeek-V4-Flash, as transformers' DeepseekV4Config defaults it
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
    head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1,
    scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, max_position_embeddings=1048576,
    rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128,
    index_topk=512, num_hash_layers=3, bos_token_id=0, eos_token_id=1, qk_rope_head_dim=64)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QuantConfig:
    quant_method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class IndexerConfig:
    """The lightning indexer of DeepSeek-V3.2's sparse attention and V4's CSA layers."""

    n_heads: int
    head_dim: int
    topk: int


@dataclass(frozen=True)
class V4Config:
    """What DeepSeek-V4 adds: one shared K=V head per layer, sliding-window attention with compressed
    (CSA, HCA) entries, the grouped output projection, hyper-connections, hash routing, clamped SwiGLU."""

    head_dim: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: tuple[str, ...]  # per layer: "sliding", "csa" or "hca"
    hash_layers: tuple[bool, ...]  # per layer: routed by tid2eid[token] instead of the learned top-k
    csa_rate: int
    hca_rate: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    swiglu_limit: float
    compress_rope: RopeConfig  # CSA/HCA layers, their compressors and indexers; sliding layers use ModelConfig.rope


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: QuantConfig | None = None
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0
    indexer: IndexerConfig | None = None  # V3.2 (every layer) and V4 (CSA layers)
    v4: V4Config | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{file}: no config.json found (is this a model directory?)")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"field 'model_type' = {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
        defaults = {"deepseek_v2": _V2_DEFAULTS, "deepseek_v32": _V32_DEFAULTS, "deepseek_v4": _V4_DEFAULTS}.get(
            model_type, _V3_DEFAULTS)
        get = lambda k: raw[k] if k in raw else defaults.get(k)  # noqa: E731
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        names = {f.name for f in fields(cls)} - {"rope", "eos_token_ids", "quantization", "model_type", "indexer", "v4"}
        nullable = {"q_lora_rank", "n_group", "topk_group", "bos_token_id"}  # null means "none", not "default"
        kwargs = {k: get(k) for k in names if get(k) is not None or (k in nullable and k in raw)}
        if kwargs.get("num_experts_per_tok") is None:
            kwargs["num_experts_per_tok"] = 0 if model_type == "deepseek_v2" else 8
        if model_type == "deepseek_v2":
            kwargs["rope_interleave"] = True  # V2 always rotates interleaved pairs
        if model_type == "deepseek_v32":
            kwargs |= dict(rope_interleave=True, first_k_dense_replace=_leading_dense(raw, kwargs))
        if model_type in ("deepseek_v32", "deepseek_v4"):
            kwargs["indexer"] = IndexerConfig(get("index_n_heads"), get("index_head_dim"), get("index_topk"))
        if model_type == "deepseek_v4":
            kwargs |= _v4_fields(raw, get)
        rope = RopeConfig(theta=float(get("rope_theta"))) if model_type == "deepseek_v4" else _rope_from_dict(raw)
        cfg = cls(model_type=model_type, rope=rope, eos_token_ids=eos_ids,
                  quantization=_quant_from_dict(raw.get("quantization_config")), **kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"field '{name}' = {getattr(self, name)!r} {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 and not (name == "kv_lora_rank" and self.v4):
                raise bad(name, "must be a positive integer")
        if self.model_type in ("deepseek_v32", "deepseek_v4") and not self.q_lora_rank:
            raise bad("q_lora_rank", f"must be a positive integer for {self.model_type}")
        if self.indexer and any(not isinstance(v, int) or v <= 0 for v in vars(self.indexer).values()):
            raise ConfigError(f"fields 'index_n_heads/index_head_dim/index_topk' = {tuple(vars(self.indexer).values())} "
                              "must be positive integers")
        if self.v4:
            _validate_v4(self)
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be within [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.moe_layer_freq != 1:
            raise bad("moe_layer_freq", "is not supported (every DeepSeek config uses 1)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported (DeepSeek uses 'silu')")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"is not one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"is not one of {SCORING_FUNCS}")
        if self.has_moe:
            self._validate_moe(bad)
        if self.rope.rope_type not in ("default", "yarn"):
            raise ConfigError(f"field 'rope_scaling.type' = {self.rope.rope_type!r} is not supported (default, yarn)")
        if self.rope.rope_type == "yarn" and (self.rope.factor is None or self.rope.factor <= 0):
            raise ConfigError(f"field 'rope_scaling.factor' = {self.rope.factor!r} must be positive")
        for i in self.eos_token_ids + ((self.bos_token_id,) if self.bos_token_id is not None else ()):
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ConfigError(f"field 'bos_token_id/eos_token_id' = {i!r} is outside the vocabulary [0, {self.vocab_size})")

    def _validate_moe(self, bad) -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise bad(name, "must be a positive integer when the model has MoE layers")
        if self.n_shared_experts is None or self.n_shared_experts < 0:
            raise bad("n_shared_experts", "must be >= 0")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"exceeds n_routed_experts={self.n_routed_experts}")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if not self.n_group or self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts} for {self.topk_method}")
            if not self.topk_group or not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be within [1, n_group={self.n_group}]")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
                raise bad("n_group", "leaves fewer than 2 experts per group (noaux_tc scores groups by their top 2)")

    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the normalized latent c_KV and the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace


def _leading_dense(raw: dict[str, Any], kwargs: dict) -> int:
    """V3.2 may spell first_k_dense_replace as mlp_layer_types: dense layers first, then sparse ones."""
    types = raw.get("mlp_layer_types")
    if types is None:
        return kwargs["first_k_dense_replace"]
    n = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if any(t != "sparse" for t in types[n:]):
        raise ConfigError(f"field 'mlp_layer_types' = {types!r} is not supported: dense layers must all come first")
    return n


def _v4_fields(raw: dict[str, Any], get) -> dict[str, Any]:
    """ModelConfig fields of a V4 config.json, as transformers writes it or as DeepSeek ships it."""
    n, head_dim = get("num_hidden_layers"), get("head_dim")
    rope_dim = raw.get("qk_rope_head_dim") or round(head_dim * raw.get("partial_rotary_factor", 64 / 512))
    rates = dict(raw.get("compress_rates") or {})
    kinds = raw.get("layer_types") or raw.get("compress_ratios") or ["hca"] * min(n, 2) + [
        "csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]
    unknown = [k for k in kinds[:n] if k not in V4_LAYER_TYPES and k not in ("csa", "hca")]
    if unknown:
        raise ConfigError(f"field 'layer_types' = {unknown[0]!r} is not a DeepSeek-V4 attention type")
    hashes = raw.get("mlp_layer_types") or ["hash_moe"] * get("num_hash_layers") + ["moe"] * n
    params = raw.get("rope_parameters") or {}
    compress = params.get("compress") if isinstance(params.get("compress"), dict) else dict(
        raw.get("rope_scaling") or {}, rope_theta=get("compress_rope_theta"), attention_factor=1.0)
    v4 = V4Config(
        head_dim=head_dim, o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"), sliding_window=get("sliding_window"),
        layer_types=tuple(V4_LAYER_TYPES.get(k, k) for k in kinds[:n]),
        hash_layers=tuple(t == "hash_moe" for t in hashes[:n]),
        csa_rate=rates.get("compressed_sparse_attention", raw.get("compress_rate_csa", 4)),
        hca_rate=rates.get("heavily_compressed_attention", raw.get("compress_rate_hca", 128)),
        hc_mult=get("hc_mult"), hc_sinkhorn_iters=get("hc_sinkhorn_iters"), hc_eps=get("hc_eps"),
        swiglu_limit=get("swiglu_limit"), compress_rope=_rope_from_dict({**raw, "rope_parameters": compress}))
    return dict(v4=v4, kv_lora_rank=0, qk_nope_head_dim=head_dim - rope_dim, qk_rope_head_dim=rope_dim,
                v_head_dim=head_dim, intermediate_size=get("moe_intermediate_size"), first_k_dense_replace=0,
                topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True, rope_interleave=True)


def _validate_v4(cfg: "ModelConfig") -> None:
    v4 = cfg.v4
    for name in ("head_dim", "o_groups", "o_lora_rank", "sliding_window", "csa_rate", "hca_rate", "hc_mult",
                 "hc_sinkhorn_iters"):
        if not isinstance(getattr(v4, name), int) or getattr(v4, name) <= 0:
            raise ConfigError(f"field '{name}' = {getattr(v4, name)!r} must be a positive integer")
    if len(v4.layer_types) != cfg.num_hidden_layers:
        raise ConfigError(f"field 'layer_types' has {len(v4.layer_types)} entries for {cfg.num_hidden_layers} layers")
    if cfg.num_attention_heads * v4.head_dim % v4.o_groups:
        raise ConfigError(f"field 'o_groups' = {v4.o_groups} must divide num_attention_heads x head_dim")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_from_dict(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_scaling' = {params!r} must be an object")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "yarn":
        return RopeConfig(theta=float(theta), rope_type=rope_type)
    max_pos = raw.get("max_position_embeddings")
    original = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None and max_pos and original:
        factor = max_pos / original
    return RopeConfig(
        theta=float(theta), rope_type="yarn", factor=factor, original_max_position_embeddings=original,
        beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True),
    )


def _quant_from_dict(q: dict[str, Any] | None) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"field 'quantization_config.quant_method' = {method!r} is not supported (fp8)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"field 'quantization_config.fmt' = {fmt!r} is not supported (e4m3)")
    block = q.get("weight_block_size") or [128, 128]
    if len(block) != 2 or any(not isinstance(b, int) or b <= 0 for b in block):
        raise ConfigError(f"field 'quantization_config.weight_block_size' = {block!r} must be two positive integers")
    return QuantConfig(quant_method=method, fmt=fmt, weight_block_size=tuple(block))


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: must be an integer >= 1")


SPECULATIVE_METHODS = {"mtp": "mtp", "deepseek_mtp": "mtp"}  # vLLM's names -> ours


@dataclass
class SpeculativeConfig:
    """vLLM's `speculative_config`: the checkpoint's MTP layer drafts num_speculative_tokens tokens per
    step and the model verifies them in its next step (moela/engine/speculative.py)."""

    method: str = "mtp"
    num_speculative_tokens: int = 1

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method = {self.method!r} is not supported: use 'mtp' (the model's "
                             "own multi-token-prediction layer)")
        self.method = SPECULATIVE_METHODS[self.method]
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config num_speculative_tokens = {k!r} is invalid: must be an integer in [1, 16]")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a dict or its JSON text (the CLI's --speculative-config); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config {value!r} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config = {value!r} is invalid: must be a dict such as "
                             '{"method": "mtp", "num_speculative_tokens": 1}')
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"speculative_config field {unknown[0]!r} is not supported (supported: method, "
                             "num_speculative_tokens)")
        return cls(**value)


@dataclass
class EngineConfig:
    model: str | Path | None = None  # None: the embedded default model
    dtype: str = "bfloat16"  # a key of DTYPES
    device: str = "cpu"  # any device torch and the reference backend support ("cuda", "cuda:1", "npu" with torch_npu, ...)
    backend: str = "auto"  # "auto": the fastest backend for the device and dtype; or a name in moela.ops.BACKENDS
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_memory: int | str | None = None  # bytes ("4GiB" works); default: max_num_seqs full contexts, <= 1/4 of memory
    block_size: int = 64
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    skip_tokenizer_init: bool = False  # token ids in and out only (no text, no stop strings)
    threads: int | str | None = None  # CPU threads: a count, "auto" (the free cores, followed), None: torch's setting
    tensor_parallel_size: int = 1  # ranks the model is split over (docs/distributed.md)
    enable_expert_parallel: bool = False  # routed experts split by expert over the ranks, not sliced
    expert_parallel_size: int | None = None  # expert groups (default: every rank with enable_expert_parallel, else 1)
    expert_placement: str | Path | None = None  # a plan from `moela plan-experts` (default: experts in order)
    distributed_timeout: float = 600.0  # seconds a collective waits for a stalled rank before failing
    runtime: str = "torch"  # "onnx": model is a `moela export onnx` directory, run by ONNX Runtime (dtype is the graphs')
    provider: str = "cpu"  # runtime "onnx": ONNX Runtime's execution provider (cpu, cuda, cann)
    cuda_graphs: bool = False  # replay decode steps from CUDA graphs captured at start-up (moela/engine/graphs.py)
    quantization: str | None = None  # weight-only: a key of QUANTIZATIONS ("int8", "int4", ...); None: the model dtype
    speculative_config: SpeculativeConfig | dict | str | None = None  # e.g. {"method": "mtp", "num_speculative_tokens": 2}
    scheduler: SchedulerConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.threads not in (None, "auto") and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                                   or self.threads < 1):
            raise ValueError(f"threads = {self.threads!r} is invalid: must be 'auto', an integer >= 1 or None")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r} is invalid: must be one of {', '.join(DTYPES)}")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend = {self.backend!r} is invalid: must be 'auto' or one of {', '.join(BACKENDS)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization = {self.quantization!r} is invalid: must be None or one of {', '.join(QUANTIZATIONS)}")
        self._check_runtime()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size = {self.block_size!r} is invalid: must be an integer >= 1")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len = {self.max_model_len!r} is invalid: must be an integer >= 2")
        load_device(self.device)  # "npu": torch_npu registers the device type
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device = {self.device!r} is invalid: use a torch device such as 'cpu' or 'cuda:0'") from None
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graphs = True needs a CUDA device, not device = {self.device!r}")
        self.scheduler = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates both
        self._check_parallel()
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    def _check_runtime(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime = {self.runtime!r} is invalid: must be one of {', '.join(RUNTIMES)}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider = {self.provider!r} is invalid: must be one of {', '.join(PROVIDERS)}")
        if self.provider != "cpu" and self.runtime != "onnx":
            raise ValueError(f"provider = {self.provider!r} applies to runtime 'onnx' only (torch runs on device=...)")
        if self.runtime == "torch":
            return
        if self.quantization is not None:
            raise ValueError(f"quantization = {self.quantization!r} applies to runtime 'torch' only (export the graphs "
                             f"in float16 instead)")
        torch_only = {"cuda_graphs": self.cuda_graphs, "speculative_config": self.speculative_config,
                      "tensor_parallel_size": self.tensor_parallel_size > 1}
        for name, used in torch_only.items():
            if used:
                raise ValueError(f"{name} applies to runtime 'torch' only, not runtime = {self.runtime!r}")

    def _check_parallel(self) -> None:
        n, ep = self.tensor_parallel_size, self.expert_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size = {n!r} is invalid: must be an integer >= 1")
        if ep is not None and (not isinstance(ep, int) or isinstance(ep, bool) or ep < 1 or n % ep):
            raise ValueError(f"expert_parallel_size = {ep!r} is invalid: must divide tensor_parallel_size = {n}")
        if self.cuda_graphs and n > 1:
            raise ValueError(f"cuda_graphs = True needs tensor_parallel_size = 1, not {n}: the other ranks follow rank 0's "
                             "eager forwards, which a graph replay skips")
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout = {self.distributed_timeout!r} is invalid: must be > 0 seconds")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def quant_format(self) -> str | None:
        """The weight format quantization names (moela.ops.reference.QUANT_FORMATS), or None."""
        return QUANTIZATIONS[self.quantization] if self.quantization else None

    def check_model(self, model: "ModelConfig") -> int:
        """The context length this engine serves the model at: max_model_len, never past the positions
        the model was built for."""
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len = {self.max_model_len} exceeds the model's max_position_embeddings = "
                             f"{limit} (config.json): it was not built for positions past that")
        return self.max_model_len or limit


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none (None, False) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig flags every command that runs the engine shares."""
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1, npu (torch_npu), ...")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="kernels: auto picks the fastest for the device and dtype")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="onnx: run a `moela export onnx` directory on ONNX Runtime (the graphs' dtype)")
    parser.add_argument("--provider", choices=PROVIDERS, default="cpu", help="ONNX Runtime's execution provider (--runtime onnx)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay decode steps from CUDA graphs captured at start-up (CUDA devices)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="weight-only quantization, done as the checkpoint loads: int8 (per output channel) or int4 "
                             f"(zero points per group of inputs; int4 = {QUANTIZATIONS['int4']})")
    parser.add_argument("--speculative-config", type=speculative_argument, default=None,
                        help='speculative decoding as JSON, e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\': '
                             "the checkpoint's MTP layer drafts, the model verifies (default: off)")
    add_threads_arg(parser)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over this many ranks, started here (or by torchrun across machines)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="split routed experts by expert over the ranks instead of slicing each one")
    parser.add_argument("--expert-parallel-size", type=int, default=None,
                        help="expert groups, each expert sliced within its group (default: every rank with "
                             "--enable-expert-parallel)")
    parser.add_argument("--expert-placement", default=None, help="expert placement plan from `moela plan-experts`")


def engine_args(args: argparse.Namespace) -> dict:
    """The EngineConfig fields of add_engine_args' flags (and --threads), as parsed."""
    return {"device": args.device, "backend": args.backend, "cuda_graphs": args.cuda_graphs, "threads": args.threads,
            "runtime": args.runtime, "provider": args.provider, "quantization": args.quantization,
            "speculative_config": args.speculative_config,
            "tensor_parallel_size": args.tensor_parallel_size, "enable_expert_parallel": args.enable_expert_parallel,
            "expert_parallel_size": args.expert_parallel_size, "expert_placement": args.expert_placement}


def speculative_argument(value: str) -> SpeculativeConfig:
    try:
        return SpeculativeConfig.parse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    from moela import threads

    parser.add_argument("--threads", type=threads.argument, default="auto",
                        help="CPU threads: a number, or auto (the cores free now, fewer when another process takes one)")


def parse_bytes(value: int | str) -> int:
    """Bytes as an integer or a size such as "4GiB", "512MB", "1e9b"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    text = value.strip().lower() if isinstance(value, str) else ""
    for unit, scale in units.items() if isinstance(value, str) else ():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    raise ValueError(f"kv_cache_memory = {value!r} is invalid: use bytes or a size like '4GiB'")
