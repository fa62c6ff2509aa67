"""Tensor and expert parallelism on torch.distributed: transforms of a built model, applied from the edges
(the model files know nothing of ranks).

    mesh = Mesh(rank=1, world=4, ep=2)      # heads and dense MLPs split 4 ways; routed experts in 2 groups
    shard = Shard(mesh, cfg)                #   of 2 ranks, each expert sliced over its group's 2 ranks
    model = load_model(path, dtype, device, cfg, shard=shard)   # each rank reads only its slices
    quantize.prepare(model, backend)
    shard.bind(model)                       # routed experts serve only this rank's (token, expert) pairs

Inference (the engine): every rank runs every token of a step. Attention splits by heads: wq (or wq_b)
and wkv_b keep the rows of this rank's heads, wo their columns; the latent projection, its norms and so
the latent cache stay whole on every rank (V3.2's indexer too). Dense MLPs and shared experts split
their intermediate dim (rows of both w13 halves, columns of w2). The routed experts of a layer are
placed on the `ep` expert groups by a Placement (in order, or a plan from moela/placement.py), and
each expert is sliced like an MLP over the world/ep ranks of its group. The router is whole on every
rank, so every rank knows every token's experts, and each (token, expert) pair is served once, by copy
`token % copies` of its expert. Each rank's attention and FFN outputs are its share of the sum; one
all-reduce after attention and one after the FFN add the shares (both also carry a dead or stalled
peer's error, as RankError).

Training (`data_parallel=True`, under FSDP2 for the rest): each rank has its own tokens, attention is
whole, and the routed experts are split by expert over all ranks. Pairs reach their experts by
all-gather + reduce-scatter (every rank gathers all tokens, serves its experts' pairs, the sums are
scattered back) or by all-to-all (each pair sent to its expert's rank and back): `moe_comm`.
"""

import re
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from moela.config import ModelConfig
from moela.errors import ConfigError, MoelaError
from moela.models.deepseek import MLA, Block
from moela.models.layers import Experts
from moela.placement import Placement

MOE_COMM = ("allgather", "alltoall")
HEAD_ROWS = ("attn.wq.weight", "attn.wq_b.weight", "attn.wkv_b.weight")  # each rank: its heads' outputs
HEAD_COLS = ("attn.wo.weight",)  # its heads' inputs
MLP_ROWS = ("ffn.w13.weight", "ffn.shared_experts.w13.weight")  # gate and up halves, each split
MLP_COLS = ("ffn.w2.weight", "ffn.shared_experts.w2.weight")
LAYER = re.compile(r"layers\.(\d+)\.")


class RankError(MoelaError):
    """A collective with the other ranks failed: a rank died, or stalled past the timeout."""


@dataclass(frozen=True)
class Mesh:
    rank: int
    world: int
    ep: int = 1  # expert groups; each expert is sliced over the world // ep ranks of its group
    data_parallel: bool = False  # training: own tokens per rank, whole attention, experts split over all ranks
    moe_comm: str = "allgather"  # training only: how pairs reach their experts, one of MOE_COMM

    def __post_init__(self) -> None:
        if self.world < 1 or self.ep < 1 or self.world % self.ep:
            raise ConfigError(f"expert_parallel_size = {self.ep} must divide the {self.world} ranks")
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is outside the {self.world} ranks")
        if self.data_parallel and self.ep != self.world:
            raise ConfigError(f"data-parallel training splits experts over all {self.world} ranks, not {self.ep}")
        if self.moe_comm not in MOE_COMM:
            raise ConfigError(f"moe_comm = {self.moe_comm!r} is invalid: must be one of {', '.join(MOE_COMM)}")

    @property
    def tp(self) -> int:
        """Ranks that split attention heads and dense MLPs."""
        return 1 if self.data_parallel else self.world

    @property
    def group_size(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank // self.group_size


@dataclass(frozen=True)
class Split:
    """How one rank's part of a weight matrix [out, in] is cut: along `dim` into `parts`, taking `index`."""

    dim: int  # 0: rows (outputs), 1: columns (inputs)
    parts: int
    index: int
    halves: bool = False  # rows are gate then up: each half is split on its own
    experts: bool = False  # a stack [E, out, in]: this rank's slots first


@dataclass(frozen=True)
class Route:
    """A layer's copies on the device: counts [E] copies per expert, rank/slot [E, C] of copy c (-1: none)."""

    counts: torch.Tensor
    rank: torch.Tensor
    slot: torch.Tensor


class Shard:
    """One rank's part of a model: which slice of each weight it keeps (split, local, pieces) and how the
    ranks' shares meet (apply: the all-reduces; bind: the routed experts' pairs)."""

    def __init__(self, mesh: Mesh, cfg: ModelConfig, placement: Placement | None = None):
        check_model(cfg, mesh)
        self.mesh, self.cfg = mesh, cfg
        moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        if placement is None:
            placement = Placement.contiguous(cfg.n_routed_experts, mesh.ep, moe_layers)
        placement.check(cfg.n_routed_experts, moe_layers, mesh.ep, "expert placement")
        self.placement = placement

    def split(self, name: str) -> Split | None:
        m = self.mesh
        i = m.rank % m.tp
        if name.endswith(HEAD_ROWS):
            return Split(0, m.tp, i)
        if name.endswith(HEAD_COLS):
            return Split(1, m.tp, i)
        if name.endswith(MLP_ROWS):
            return Split(0, m.tp, i, halves=True)
        if name.endswith(MLP_COLS):
            return Split(1, m.tp, i)
        if name.endswith("ffn.experts.w13"):
            return Split(0, m.group_size, m.rank % m.group_size, halves=True, experts=True)
        if name.endswith("ffn.experts.w2"):
            return Split(1, m.group_size, m.rank % m.group_size, experts=True)
        return None

    def slots(self, name: str) -> list[int]:
        """The logical expert of each of this rank's slots in the layer of parameter `name`."""
        layer = LAYER.search(name)
        return self.placement.rank_slots(int(layer[1]) if layer else self.cfg.num_hidden_layers, self.mesh.ep_rank)

    def local(self, name: str, full: torch.Tensor) -> torch.Tensor | None:
        """This rank's part of the whole parameter `name` (None: it keeps all of it)."""
        s = self.split(name)
        if s is None or (s.parts == 1 and not s.experts):
            return None
        t = full[self.slots(name)] if s.experts else full  # [slots, out, in]
        dim = t.dim() - 2 + s.dim
        if s.halves:
            return torch.cat([h.chunk(s.parts, dim)[s.index] for h in t.chunk(2, dim)], dim).contiguous()
        return t.chunk(s.parts, dim)[s.index].contiguous()

    def apply(self, model: nn.Module) -> None:
        """Cut every parameter to this rank's part (meta or materialized) and, for inference, add the sums."""
        for name, p in list(model.named_parameters()):
            local = self.local(name, p.detach())
            if local is not None:
                owner, attr = name.rpartition(".")[::2]
                setattr(model.get_submodule(owner), attr, nn.Parameter(local, requires_grad=p.requires_grad))
        for module in model.modules():
            if isinstance(module, MLA):
                module.n_heads //= self.mesh.tp
            if isinstance(module, Block) and self.mesh.tp > 1:
                module.attn.register_forward_hook(all_reduce_output)
                module.ffn.register_forward_hook(all_reduce_output)

    def pieces(self, target: tuple, shape: list[int]) -> list[tuple[tuple, tuple]]:
        """The parts of one checkpoint tensor (filling `target` of the whole model, with `shape`) this rank
        keeps: [(its target in the cut model, index into the checkpoint tensor)], none if it keeps nothing."""
        name, expert, half = target
        s = self.split(name)
        if s is None or (s.parts == 1 and not s.experts):
            return [(target, ())]
        if not s.experts:
            return _matrix_pieces(s, name, None, (), half, shape)
        slots = self.slots(name)
        if expert is not None:  # one expert's matrix (or half of it), for each slot holding that expert
            return [p for j, e in enumerate(slots) if e == expert for p in _matrix_pieces(s, name, j, (), half, shape)]
        return [p for j, e in enumerate(slots) for p in _matrix_pieces(s, name, j, (e,), half, shape[1:])]

    def bind(self, model: nn.Module) -> None:
        """Route each layer's pairs to its experts' copies (after quantize.prepare bound the backend's ops)."""
        m = self.mesh
        if m.ep == 1:
            return  # every rank holds a slice of every expert: each serves all pairs
        serve = {False: serve_pairs, True: gathered if m.moe_comm == "allgather" else exchanged}[m.data_parallel]
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                route = self.route(name, module.load.device)
                module.ops = replace(module.ops, moe=partial(serve, moe=module.ops.moe, route=route, me=m.ep_rank))

    def route(self, name: str, device: torch.device) -> Route:
        layer = LAYER.search(name)
        copies = self.placement.copies(int(layer[1]) if layer else self.cfg.num_hidden_layers)
        width = max(len(c) for c in copies)
        rank = [[r for r, _ in c] + [-1] * (width - len(c)) for c in copies]
        slot = [[s for _, s in c] + [-1] * (width - len(c)) for c in copies]
        as_tensor = partial(torch.tensor, dtype=torch.long, device=device)
        return Route(as_tensor([len(c) for c in copies]), as_tensor(rank), as_tensor(slot))


def check_model(cfg: ModelConfig, mesh: Mesh) -> None:
    if cfg.v4:
        raise ConfigError("tensor and expert parallelism cover DeepSeek-V2, V3 (Kimi K2) and V3.2; DeepSeek-V4 "
                          "runs on one rank (tensor_parallel_size = 1)")
    sizes = {"num_attention_heads": (cfg.num_attention_heads, mesh.tp), "intermediate_size": (cfg.intermediate_size, mesh.tp),
             "moe_intermediate_size": (cfg.moe_intermediate_size, mesh.group_size),
             "n_shared_experts * moe_intermediate_size": (cfg.n_shared_experts * cfg.moe_intermediate_size, mesh.tp)}
    for field, (value, parts) in sizes.items():
        if value % parts:
            raise ConfigError(f"{field} = {value} does not split evenly over {parts} ranks")


def _matrix_pieces(s: Split, name: str, slot: int | None, lead: tuple, half: int | None, shape: list[int]) -> list:
    """This rank's pieces of one checkpoint matrix [out, in] (or one gate/up half of it): the local target
    (parameter, slot, half) each fills, and the index that reads it (after `lead`, the expert's index)."""
    size = shape[s.dim]
    if s.halves and half is None:  # gate and up rows in one tensor: this rank's rows of each half
        step = size // 2 // s.parts
        return [((name, slot, h), lead + (slice(h * size // 2 + s.index * step, h * size // 2 + (s.index + 1) * step),))
                for h in (0, 1)]
    step = size // s.parts
    cut = slice(s.index * step, (s.index + 1) * step)
    return [((name, slot, half), lead + ((cut,) if s.dim == 0 else (slice(None), cut)))]


def all_reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: this rank's share of a layer's output -> the sum over ranks."""
    try:
        dist.all_reduce(output)
    except RuntimeError as e:
        raise RankError(f"rank {dist.get_rank()}: a collective with the other ranks failed; another rank died or "
                        f"stalled past the timeout ({reason(e)})") from None
    return output


def reason(error: Exception) -> str:
    """The gist of a torch.distributed error: its first sentence, without the source location."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]


# ---- routed experts: this rank's share of the (token, expert) pairs ----

def serve_pairs(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13, w2, limit: float | None = None, *,
                moe, route: Route, me: int) -> torch.Tensor:
    """This rank's share of sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) -> [T, d]: the pairs whose
    chosen copy lives here, run through the backend's moe with one local expert per pair."""
    T, k = indices.shape
    token = torch.arange(T, device=x.device)[:, None].expand(T, k)
    copy = token % route.counts[indices]  # [T, k] which copy serves each pair
    rows, ks = (route.rank[indices, copy] == me).nonzero(as_tuple=True)  # the pairs served here (read on the host)
    if not len(rows):
        return torch.zeros_like(x)
    slots = route.slot[indices[rows, ks], copy[rows, ks]]
    y = moe(x[rows], weights[rows, ks][:, None], slots[:, None], w13, w2, limit)  # [P, d], weighted
    return torch.zeros_like(x).index_add_(0, rows, y)


def gathered(x, weights, indices, w13, w2, limit=None, *, moe, route: Route, me: int) -> torch.Tensor:
    """Own tokens [T, d] in, their routed output out: every rank's tokens gathered, this rank's pairs
    served, the sums scattered back to the tokens' ranks."""
    everyone = AllGather.apply(x)  # [world * T, d]
    served = serve_pairs(everyone, AllGather.apply(weights), gather(indices), w13, w2, limit, moe=moe, route=route, me=me)
    return ReduceScatter.apply(served)


def exchanged(x, weights, indices, w13, w2, limit=None, *, moe, route: Route, me: int) -> torch.Tensor:
    """Own tokens [T, d] in, their routed output out: each pair's row sent to its copy's rank, served
    there, sent back, then weighted and summed per token."""
    T, k = indices.shape
    copy = (torch.arange(T, device=x.device)[:, None] + me * T) % route.counts[indices]  # [T, k]
    dest = route.rank[indices, copy].flatten()
    order = dest.argsort(stable=True)  # pairs grouped by destination rank
    send = torch.bincount(dest, minlength=dist.get_world_size())
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    send, recv = send.tolist(), recv.tolist()
    rows = order // k
    slots = torch.empty(sum(recv), dtype=torch.long, device=x.device)
    dist.all_to_all_single(slots, route.slot[indices, copy].flatten()[order].contiguous(), recv, send)
    arrived = AllToAll.apply(x[rows], recv, send)  # [R, d] pairs this rank serves
    ones = torch.ones(len(slots), 1, device=x.device)
    back = AllToAll.apply(moe(arrived, ones, slots[:, None], w13, w2, limit), send, recv)  # [T*k, d] in `order`
    weighted = back * weights.flatten()[order][:, None].to(back.dtype)
    return torch.zeros_like(x).index_add_(0, rows, weighted)


def gather(t: torch.Tensor) -> torch.Tensor:
    out = t.new_empty(dist.get_world_size() * t.shape[0], *t.shape[1:])
    dist.all_gather_single(out, t.contiguous())
    return out


class AllGather(torch.autograd.Function):
    """Rows of every rank, in rank order; the gradient of each rank's rows is summed back to it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return ReduceScatter.forward(ctx, grad)


class ReduceScatter(torch.autograd.Function):
    """The sum over ranks of [world * T, ...], each rank keeping its own T rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0] // dist.get_world_size(), *x.shape[1:])
        dist.reduce_scatter_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return gather(grad)


class AllToAll(torch.autograd.Function):
    """Rows sent in `send` counts to each rank, `recv` counts received from each; the gradient goes back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        ctx.counts = recv, send
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        recv, send = ctx.counts
        return AllToAll.forward(ctx, grad, send, recv), None, None
