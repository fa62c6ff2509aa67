"""Layers the DeepSeek models share: linear, RMSNorm, YaRN rope frequencies, SwiGLU MLP, the router
and the routed experts. Math only; kernels are reached through `self.ops`, the backend's op surface.

    y = Linear(64, 128)(x)                     # self.ops.linear(x, self.weight)
    weights, indices = Gate(cfg)(x)            # [T, k] fp32 routing weights, [T, k] expert ids

Every layer that calls an op derives from OpsModule, whose `ops` is the reference backend until
`quantize.prepare(model, backend)` hands the built model to another one.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from moela.config import ModelConfig, RopeConfig, yarn_mscale
from moela.models.context import CacheSpec
from moela.ops import REFERENCE, Backend
from moela.ops.reference import swiglu


class OpsModule(nn.Module):
    """A module whose forward calls the op surface through self.ops."""

    ops: Backend = REFERENCE


class Linear(OpsModule):
    """y = x W^T (no bias; DeepSeek's projections have none), initialized as nn.Linear is. `sliced`: the
    model also reads the weight itself (per head, per group), so backends keep it in its plain layout."""

    def __init__(self, in_features: int, out_features: int, sliced: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sliced = sliced
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight)


class RMSNorm(OpsModule):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); given a residual, (norm(x + residual), x + residual), the add fused where the backend can."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rope dims and the cos/sin scale (YaRN's attention factor)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope.rope_type != "yarn":
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)
    factor = rope.attention_factor
    if factor is None:
        if rope.mscale and rope.mscale_all_dim:
            factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            factor = yarn_mscale(rope.factor)
    return inv_freq, float(factor)


class Rope(nn.Module):
    """cos, sin [T, r/2] of token positions for one rope configuration, scaled by YaRN's attention factor."""

    def __init__(self, rope: RopeConfig, dim: int):
        super().__init__()
        self.config, self.dim = rope, dim
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute inv_freq (not saved with the weights), on the device of the module's parameters' peers."""
        inv_freq, self.scale = rope_inv_freq(self.config, self.dim)
        device = self.inv_freq.device if hasattr(self, "inv_freq") else None
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[:, None].float() * self.inv_freq  # [T, r/2]
        return angles.cos() * self.scale, angles.sin() * self.scale


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one matrix: w2(silu(x w1) * x w3); V4 clamps both at `limit`."""

    def __init__(self, dim: int, inter_dim: int, limit: float | None = None):
        super().__init__()
        self.w13 = Linear(dim, 2 * inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x), self.limit))


class Gate(nn.Module):
    """Router: scores, optional group limit, top-k, weights. Returns (weights fp32, indices) [T, k]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.score_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if self.method == "noaux_tc" else None
        self.register_buffer("bias", bias)  # e_score_correction_bias, kept in fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = router_scores(logits, self.score_func)
        choice = scores if self.bias is None else scores + self.bias
        if self.method != "greedy":
            grouped = choice.view(x.shape[0], self.n_group, -1)  # [T, G, E/G]
            group_scores = grouped.amax(-1) if self.method == "group_limited_greedy" else grouped.topk(2, -1)[0].sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], True)
            fill = 0.0 if self.method == "group_limited_greedy" else float("-inf")
            choice = grouped.masked_fill(~keep[..., None], fill).flatten(1)
        indices = choice.topk(self.topk, dim=-1)[1]
        weights = (scores if self.method == "noaux_tc" else choice).gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices


class HashGate(nn.Module):
    """V4's hash routing: the experts come from a fixed table of the token id (tid2eid), the weights from the
    learned scores of those experts, normalized. Returns (weights fp32, indices) [T, k]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.score_func, self.route_scale = cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = router_scores(F.linear(x.float(), self.weight.float()), self.score_func)  # [T, E]
        indices = self.tid2eid[tokens]
        weights = scores.gather(1, indices)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale, indices


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    return logits.sigmoid() if score_func == "sigmoid" else F.softplus(logits).sqrt()  # V4: sqrtsoftplus


class Experts(OpsModule):
    """Routed experts stacked as [E, ...]; the backend's moe op runs a step's tokens grouped by expert."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float | None = None):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.limit = limit  # V4's SwiGLU clamp
        self.register_buffer("load", torch.zeros(n_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.flatten()
        self.load.index_add_(0, flat, torch.ones_like(flat))  # tokens routed to each expert since start-up
        return self.ops.moe(x, weights, indices, self.w13, self.w2, self.limit)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, n_shared * cfg.moe_intermediate_size) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.gate(x)
        y = self.experts(x, weights, indices)
        return y if self.shared_experts is None else y + self.shared_experts(x)


def reset_buffers(model: nn.Module) -> None:
    """(Re)compute a model's non-persistent buffers (rope frequencies, expert load counters): after
    building on the meta device and materializing with to_empty."""
    for module in model.modules():
        if isinstance(module, Rope):
            module.init_buffers()
        elif isinstance(module, Experts):
            module.load.zero_()


def layer_cache_specs(layers: nn.ModuleList) -> list[list[CacheSpec]]:
    """What each layer's attention caches, in layer order."""
    return [layer.attn.cache_specs() for layer in layers]


def attach_layer_caches(layers: nn.ModuleList, caches: list[dict[str, torch.Tensor]] | None) -> None:
    """Give each layer's attention its cache tensors by CacheSpec name, a dotted path below the attention
    module (None detaches them)."""
    for layer, specs, i in zip(layers, layer_cache_specs(layers), range(len(layers))):
        for spec in specs:
            path, _, name = spec.name.rpartition(".")
            setattr(layer.attn.get_submodule(path), name, None if caches is None else caches[i][spec.name])
