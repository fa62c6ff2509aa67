"""The model's configuration (from a HF `config.json`), validated once, and the names every CLI and
API shares: dtypes, quantizations, the embedded model's directory. The engine's own configuration is
moela/engine/config.py.

    cfg = ModelConfig.from_pretrained("path/to/model")   # or ModelConfig.from_dict(json.load(...))
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

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"  # the embedded default model
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
RUN_DTYPES = ("auto", *DTYPES)  # what --dtype and EngineConfig.dtype take: "auto" is resolve_dtype's choice
# Weight-only quantization (LLM(quantization=...), --quantization): name -> format of
# moela.ops.reference.QUANT_FORMATS. int8: one scale per output channel; int4: a scale and a zero
# point per group of input channels.
QUANTIZATIONS = {"int8": "int8", "int4": "int4-g128", "int4-g32": "int4-g32", "int4-g64": "int4-g64",
                 "int4-g128": "int4-g128"}
DTYPE_BYTES = {name: float(size) for name, (_, size) in DTYPE_TABLE.items()}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A name of RUN_DTYPES as a torch dtype. "auto": bfloat16 where the device computes in it natively;
    float32 on a CPU whose oneDNN has no bf16 instructions (AVX2-only x86, for one: there torch runs bf16
    GEMMs in scalar code, ~100x slower than fp32, and cannot pack bf16 weights) and float16 on a CUDA
    device older than Ampere."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none (None, False) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
