"""Cost model for DeepSeek-family models: parameters, cache bytes, FLOPs, roofline speed and price.

    from moela.cost.formulas import param_counts, cache_bytes_per_token, decode_roofline
    from moela.cost.catalog import load_model, load_hardware
    shape = load_model("deepseek-v3").shape
    param_counts(shape).total                                  # 671,026,404,352
    cache_bytes_per_token(shape, "bf16")                       # 70,272.0 (the MLA latent)
    decode_roofline(shape, load_hardware("h800"), batch=64, context=4096, dtype="fp8")

Math only: every number follows from a config and a chip's datasheet figures (docs/cost-model.md
gives the formulas and the roofline method).
Three attention kinds: "mla" (V2, V3, Kimi K2: the cache holds the latent c_KV and k_pe), "dsa"
(V3.2: MLA plus a lightning indexer whose keys are cached too and which picks index_topk keys),
"v4" (one shared K=V head of head_dim; sliding-window, CSA and HCA layers with compressed caches).
Multi-device numbers assume weights, cache and work spread evenly, with no communication cost, except
`parallel_decode`: tensor vs expert parallelism with the bytes each moves over a link of given bandwidth.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from moela.config import DTYPE_BYTES

MEMORY_UTIL = 0.9  # share of device memory given to weights + cache (vLLM's default gpu_memory_utilization)


@dataclass(frozen=True)
class CostShape:
    """The numbers of a model config that its cost depends on (V4: kv_lora_rank 0, head_dim = nope + rope)."""

    name: str
    attention: str  # "mla", "dsa" or "v4"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    n_dense_layers: int
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    o_groups: int = 0
    o_lora_rank: int = 0
    hc_mult: int = 0
    sliding_window: int = 0
    n_csa_layers: int = 0
    n_hca_layers: int = 0
    csa_rate: int = 4
    hca_rate: int = 128

    @property
    def head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_layers - self.n_dense_layers

    @property
    def n_sliding_layers(self) -> int:
        return self.num_layers - self.n_csa_layers - self.n_hca_layers


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gb: float  # 1e9 bytes per device
    bandwidth_tbs: float  # memory bandwidth, 1e12 bytes/s
    tflops: dict[str, float] = field(default_factory=dict)  # dense peak per dtype ("bf16", "fp8", "int8")
    sources: dict[str, str] = field(default_factory=dict)  # figure name ("memory_gb", "bf16", ...) -> source
    link_gbs: float | None = None  # device-to-device bandwidth, one direction, 1e9 bytes/s (NVLink, HCCS)

    def flops_per_s(self, dtype: str) -> float:
        """Without native math for `dtype` (int4, or fp8 on A100/Ascend) weights are dequantized: bf16 rate."""
        return 1e12 * self.tflops.get(dtype, self.tflops["bf16"])


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # weights one token uses, embedding and lm_head included (the spec's "active")
    embedding: int
    routed: int  # every routed expert of every layer
    expert: int  # one routed expert
    moe_layers: int

    @property
    def active_excl_embedding(self) -> int:
        return self.active - self.embedding

    @property
    def always_read(self) -> int:
        """Weights every decode step reads whatever the routing: all but the embedding and routed experts."""
        return self.total - self.embedding - self.routed


# ---- parameters (exact: equal to the count of the built model; docs/cost-model.md) ----

def attention_params(s: CostShape, kind: str = "") -> int:
    """One layer's attention; `kind` is "sliding", "csa" or "hca" for V4 layers."""
    d, h, rq = s.hidden_size, s.num_heads, s.q_lora_rank
    if s.attention == "v4":
        return _v4_attention_params(s, kind)
    q = d * h * s.head_dim if rq is None else d * rq + rq + rq * h * s.head_dim
    kv = d * (s.kv_lora_rank + s.qk_rope_head_dim) + s.kv_lora_rank
    kv += s.kv_lora_rank * h * (s.qk_nope_head_dim + s.v_head_dim)
    params = q + kv + h * s.v_head_dim * d
    if s.attention == "dsa":
        ih, ic = s.index_n_heads, s.index_head_dim
        params += rq * ih * ic + d * ic + 2 * ic + d * ih  # wq_b, wk, k_norm (LayerNorm), weights_proj
    return params


def _v4_attention_params(s: CostShape, kind: str) -> int:
    d, h, rq, hd, n = s.hidden_size, s.num_heads, s.q_lora_rank, s.head_dim, s.hc_mult
    params = d * rq + rq + rq * h * hd + d * hd + hd + h * hd * s.o_lora_rank + s.o_groups * s.o_lora_rank * d + h
    params += 2 * ((2 + n) * n * n * d + (2 + n) * n + 3)  # mHC of attention and FFN
    if kind == "csa":
        ih, ic, m = s.index_n_heads, s.index_head_dim, s.csa_rate
        params += 4 * d * hd + m * 2 * hd + hd  # compressor: kv + gate (two series), position bias, norm
        params += 4 * d * ic + m * 2 * ic + ic + rq * ih * ic + d * ih  # indexer: its compressor, wq_b, weights
    elif kind == "hca":
        params += 2 * d * hd + s.hca_rate * hd + hd
    return params


def _attention_total(s: CostShape) -> int:
    if s.attention != "v4":
        return s.num_layers * attention_params(s)
    return (s.n_sliding_layers * attention_params(s, "sliding") + s.n_csa_layers * attention_params(s, "csa")
            + s.n_hca_layers * attention_params(s, "hca"))


def param_counts(s: CostShape) -> ParamCounts:
    d = s.hidden_size
    embedding = s.vocab_size * d
    head = embedding + d  # lm_head + final norm
    if s.attention == "v4":
        head += s.hc_mult * s.hc_mult * d + s.hc_mult + 1  # HyperHead
    expert = 3 * d * s.moe_intermediate_size
    per_moe = s.n_routed_experts * d + s.n_shared_experts * expert  # router + shared experts
    fixed = (embedding + head + _attention_total(s) + 2 * d * s.num_layers
             + s.n_dense_layers * 3 * d * s.intermediate_size + s.n_moe_layers * per_moe)
    routed = s.n_moe_layers * s.n_routed_experts * expert
    active = fixed + s.n_moe_layers * s.top_k * expert
    return ParamCounts(fixed + routed, active, embedding, routed, expert, s.n_moe_layers)


def weight_bytes(s: CostShape, dtype: str) -> float:
    """Every weight in `dtype` (block scales and fp32 norms ignored: < 1% of the total)."""
    return param_counts(s).total * DTYPE_BYTES[dtype]


# ---- cache ----

def cache_values_per_token(s: CostShape) -> float:
    """Values cached per token of context, all layers: what grows with the sequence."""
    if s.attention == "v4":
        return (s.n_csa_layers * (s.head_dim + s.index_head_dim) / s.csa_rate
                + s.n_hca_layers * s.head_dim / s.hca_rate)
    latent = s.kv_lora_rank + s.qk_rope_head_dim
    return s.num_layers * (latent + (s.index_head_dim if s.attention == "dsa" else 0))


def cache_values_fixed(s: CostShape) -> int:
    """V4's per-sequence part that does not grow: the sliding window and full compressor buffers."""
    if s.attention != "v4":
        return 0
    hd, ic = s.head_dim, s.index_head_dim
    window = s.num_layers * s.sliding_window * hd
    hca = s.n_hca_layers * (s.hca_rate - 1) * 2 * hd  # pending kv + gate rows
    csa = s.n_csa_layers * ((s.csa_rate - 1) * 4 * (hd + ic) + s.csa_rate * 2 * (hd + ic))  # pending + overlap
    return window + hca + csa


def cache_bytes_per_token(s: CostShape, dtype: str) -> float:
    return cache_values_per_token(s) * DTYPE_BYTES[dtype]


def cache_bytes_per_sequence(s: CostShape, context: int, dtype: str) -> float:
    return (cache_values_per_token(s) * context + cache_values_fixed(s)) * DTYPE_BYTES[dtype]


def indexer_bytes_per_token(s: CostShape, dtype: str) -> float:
    """The lightning-indexer keys inside the cache (V3.2 per token; V4 per compressed entry, amortized)."""
    if s.attention == "dsa":
        return s.num_layers * s.index_head_dim * DTYPE_BYTES[dtype]
    if s.attention == "v4":
        return s.n_csa_layers * s.index_head_dim / s.csa_rate * DTYPE_BYTES[dtype]
    return 0.0


def mha_bytes_per_token(s: CostShape, dtype: str, kv_heads: int | None = None) -> float:
    """K and V of every head (or of `kv_heads` heads: GQA) at head dim v_head_dim, every layer."""
    return 2 * (kv_heads or s.num_heads) * s.v_head_dim * s.num_layers * DTYPE_BYTES[dtype]


# ---- FLOPs ----

def _point(context: float) -> Callable[[float, int], float]:
    """keys(cap, rate): cached entries at one stride-`rate` position `context`, at most `cap`."""
    return lambda cap, rate: min(context / rate, cap)


def _prompt_mean(length: int) -> Callable[[float, int], float]:
    """keys(cap, rate) averaged over the positions 1..length of a prompt."""
    def mean(cap: float, rate: int) -> float:
        ramp = min(length, cap * rate)  # positions before the cap is reached
        capped = (length - ramp) * cap if ramp < length else 0.0
        return (ramp * (ramp + 1) / (2 * rate) + capped) / length
    return mean


def _attention_flops(s: CostShape, keys: Callable[[float, int], float], absorbed: bool) -> float:
    """Score and value FLOPs of one query token, all layers (projections are counted as parameters)."""
    h, inf = s.num_heads, math.inf
    index = 2 * s.index_n_heads * s.index_head_dim  # FLOPs per indexer key
    if s.attention == "v4":
        per_key = 4 * h * s.head_dim  # scores and values over the shared K=V head
        window = keys(s.sliding_window, 1)
        csa = per_key * (window + keys(s.index_topk, s.csa_rate)) + index * keys(inf, s.csa_rate)
        hca = per_key * (window + keys(inf, s.hca_rate))
        return s.n_sliding_layers * per_key * window + s.n_csa_layers * csa + s.n_hca_layers * hca
    if absorbed:  # scores over [c_KV | k_pe], values are c_KV
        per_key = 2 * h * (2 * s.kv_lora_rank + s.qk_rope_head_dim)
    else:  # decompressed K [nope | rope] and V
        per_key = 2 * h * (s.head_dim + s.v_head_dim)
    if s.attention == "dsa":
        return s.num_layers * (per_key * keys(s.index_topk, 1) + index * keys(inf, 1))
    return s.num_layers * per_key * keys(inf, 1)


def attention_flops(s: CostShape, context: int, prefill: bool = False) -> float:
    """Decode: one token at `context` cached tokens, absorbed MLA. Prefill: the mean per token of a
    `context`-token causal prompt, decompressed (naive) MLA."""
    keys = _prompt_mean(context) if prefill else _point(context)
    return _attention_flops(s, keys, absorbed=not prefill)


def decode_flops_per_token(s: CostShape, context: int) -> float:
    return 2 * param_counts(s).active_excl_embedding + attention_flops(s, context)


def prefill_flops_per_token(s: CostShape, context: int) -> float:
    return 2 * param_counts(s).active_excl_embedding + attention_flops(s, context, prefill=True)


def train_flops_per_token(s: CostShape, context: int) -> float:
    """Forward + backward (twice the forward) over a `context`-token sequence."""
    return 3 * prefill_flops_per_token(s, context)


def kv_read_values(s: CostShape, context: int) -> float:
    """Cached values one decode token reads at `context`: sparse attention reads only what it picks."""
    keys, inf = _point(context), math.inf
    if s.attention == "v4":
        hd, window = s.head_dim, keys(s.sliding_window, 1)
        csa = hd * (window + keys(s.index_topk, s.csa_rate)) + s.index_head_dim * keys(inf, s.csa_rate)
        hca = hd * (window + keys(inf, s.hca_rate))
        return s.n_sliding_layers * hd * window + s.n_csa_layers * csa + s.n_hca_layers * hca
    latent = s.kv_lora_rank + s.qk_rope_head_dim
    if s.attention == "dsa":
        return s.num_layers * (latent * keys(s.index_topk, 1) + s.index_head_dim * context)
    return s.num_layers * latent * context


# ---- memory planning, roofline, price ----

def expected_experts(n_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts `batch` tokens touch in one layer if each picks `top_k` uniformly: E(1-(1-k/E)^B)."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def devices_needed(nbytes: float, hw: Hardware, util: float = MEMORY_UTIL) -> int:
    return max(1, math.ceil(nbytes / (hw.memory_gb * 1e9 * util)))


def free_bytes(s: CostShape, hw: Hardware, dtype: str, devices: int, util: float = MEMORY_UTIL) -> float:
    return max(0.0, devices * hw.memory_gb * 1e9 * util - weight_bytes(s, dtype))


def max_cached_tokens(s: CostShape, hw: Hardware, dtype: str, kv_dtype: str, devices: int) -> int:
    """Tokens of cache in what memory the weights leave (V4: its fixed per-sequence part excluded)."""
    return int(free_bytes(s, hw, dtype, devices) // cache_bytes_per_token(s, kv_dtype))


def max_sequences(s: CostShape, hw: Hardware, dtype: str, kv_dtype: str, devices: int, context: int) -> int:
    return int(free_bytes(s, hw, dtype, devices) // cache_bytes_per_sequence(s, context, kv_dtype))


def decode_bytes(s: CostShape, batch: int, context: int, dtype: str, kv_dtype: str | None = None) -> tuple[float, float]:
    """(weight bytes, cache bytes) one decode step of `batch` sequences at `context` reads: every
    always-read weight, the expected distinct routed experts of the batch, each sequence's cache."""
    p = param_counts(s)
    touched = p.moe_layers * expected_experts(s.n_routed_experts, s.top_k, batch) * p.expert
    return ((p.always_read + touched) * DTYPE_BYTES[dtype],
            batch * kv_read_values(s, context) * DTYPE_BYTES[kv_dtype or dtype])


@dataclass(frozen=True)
class Roofline:
    devices: int
    weight_bytes: float  # weights read per decode step
    kv_bytes: float  # cache read per decode step
    flops: float  # per decode step
    seconds: float  # per decode step
    tokens_per_s: float  # all devices together
    bound: str  # "memory" or "compute"

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_s / self.devices


def _compute_seconds(s: CostShape, hw: Hardware, context: int, dtype: str, kv_dtype: str, prefill: bool) -> float:
    """One token's FLOPs at peak: projections at the weight dtype's rate, attention at the cache dtype's."""
    matmul = 2 * param_counts(s).active_excl_embedding
    return matmul / hw.flops_per_s(dtype) + attention_flops(s, context, prefill) / hw.flops_per_s(kv_dtype)


def decode_roofline(s: CostShape, hw: Hardware, batch: int, context: int, dtype: str,
                    kv_dtype: str | None = None, devices: int | None = None) -> Roofline:
    """One decode step of `batch` sequences at `context`, on the fewest devices that hold them by default."""
    kv_dtype = kv_dtype or dtype
    if devices is None:
        need = weight_bytes(s, dtype) + batch * cache_bytes_per_sequence(s, context, kv_dtype)
        devices = devices_needed(need, hw)
    weights, kv = decode_bytes(s, batch, context, dtype, kv_dtype)
    memory_s = (weights + kv) / (devices * hw.bandwidth_tbs * 1e12)
    compute_s = batch * _compute_seconds(s, hw, context, dtype, kv_dtype, prefill=False) / devices
    seconds = max(memory_s, compute_s)
    bound = "memory" if memory_s >= compute_s else "compute"
    flops = batch * decode_flops_per_token(s, context)
    return Roofline(devices, weights, kv, flops, seconds, batch / seconds, bound)


def prefill_tokens_per_s(s: CostShape, hw: Hardware, context: int, dtype: str, kv_dtype: str | None = None,
                         devices: int = 1) -> float:
    """Compute-bound prefill of `context`-token prompts at the chip's dense peak."""
    return devices / _compute_seconds(s, hw, context, dtype, kv_dtype or dtype, prefill=True)


def usd_per_million_tokens(tokens_per_s: float, devices: int, usd_per_device_hour: float) -> float:
    return usd_per_device_hour * devices / (tokens_per_s * 3600) * 1e6


# ---- tensor vs expert parallelism: what crosses the links ----

def allreduce_bytes_per_token(s: CostShape, devices: int, dtype: str) -> float:
    """Bytes one device sends per token in a ring all-reduce of a layer's output [T, d] (tensor parallelism:
    every device runs every token and the partial sums meet): 2 (D - 1) / D of a hidden state."""
    return 2 * (devices - 1) / devices * s.hidden_size * DTYPE_BYTES[dtype]


def alltoall_bytes_per_token(s: CostShape, devices: int, dtype: str) -> float:
    """Bytes one MoE layer sends off the device per token it holds, under expert parallelism with each device
    running its own tokens: the hidden state to each of its top_k experts and the outputs back, for the share
    (D - 1) / D of experts that live elsewhere (dispatch + combine)."""
    return 2 * s.top_k * s.hidden_size * DTYPE_BYTES[dtype] * (devices - 1) / devices


@dataclass(frozen=True)
class ParallelStep:
    """One decode step on `devices` devices: per-device memory time, link time, their sum."""

    memory_s: float
    comm_s: float

    @property
    def seconds(self) -> float:
        return self.memory_s + self.comm_s


def parallel_decode(s: CostShape, hw: Hardware, batch: int, context: int, dtype: str, devices: int, link_gbs: float,
                    imbalance: float = 1.0) -> dict[str, ParallelStep]:
    """A memory-bound decode step of `batch` sequences under the two ways to split a MoE model:

    "tensor": every device runs every token and holds 1/D of every weight (heads, MLP and expert widths);
    two all-reduces per layer (after attention, after the FFN).
    "expert": each device runs its own batch / D sequences with whole attention and shared weights (data
    parallel) and holds E/D routed experts; one all-to-all dispatch and combine per MoE layer. The device
    with the most routed tokens sets the pace: its expert reads are `imbalance` (max/mean load, what
    `moela plan-experts` reports) times the mean.
    Link time is bytes / link_gbs, not overlapped with compute (an upper bound on what it costs).
    """
    p, b, bw = param_counts(s), DTYPE_BYTES[dtype], devices * hw.bandwidth_tbs * 1e12
    experts = p.moe_layers * expected_experts(s.n_routed_experts, s.top_k, batch) * p.expert * b
    kv = batch * kv_read_values(s, context) * b
    link = link_gbs * 1e9
    tensor = ParallelStep((p.always_read * b + experts + kv) / bw,
                          2 * s.num_layers * batch * allreduce_bytes_per_token(s, devices, dtype) / link)
    expert_bytes = p.always_read * b + (experts * imbalance + kv) / devices
    expert = ParallelStep(expert_bytes / (hw.bandwidth_tbs * 1e12),
                          p.moe_layers * batch / devices * alltoall_bytes_per_token(s, devices, dtype) / link)
    return {"tensor": tensor, "expert": expert}
