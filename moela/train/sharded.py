"""Training under torchrun with FSDP2 plus expert parallelism: every weight but the routed experts is sharded
by FSDP2 (fully_shard per block, then the whole model), and the routed experts are split by expert over the
ranks (moela/parallel.py, data_parallel=True), each rank's tokens travelling to them and back.

    shard = shard_model(net, cfg, moe_comm="auto")           # in Trainer, when TrainConfig.expert_parallel
    loss.backward(); finish_grads(net, world)                # expert grads averaged like FSDP's
    norm = clip_grad_norm(net.parameters(), 1.0)             # one norm over FSDP shards and local experts
    state = full_state(net)                                  # on every rank; whole tensors, for saving

Each rank keeps its own batch rows, so losses match a single-process run of the same global batch: FSDP
averages the gradients of sharded weights over ranks; an expert's gradient already sums every rank's
tokens (they reached it through the collectives), so it is divided by the rank count to match.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from moela.config import ModelConfig
from moela.models.deepseek import Block
from moela.parallel import Mesh, Shard


def expert_params(net: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in net.named_parameters() if n.endswith(("ffn.experts.w13", "ffn.experts.w2"))}


def shard_model(net: nn.Module, cfg: ModelConfig, moe_comm: str = "auto") -> Shard:
    """Split `net` (initialized alike on every rank) in place: experts by expert, the rest by FSDP2."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if moe_comm == "auto":
        moe_comm = pick_moe_comm(world, cfg.num_experts_per_tok)
    shard = Shard(Mesh(rank, world, ep=world, data_parallel=True, moe_comm=moe_comm), cfg)
    shard.apply(net)
    shard.bind(net)
    local = set(expert_params(net).values())
    for block in [m for m in net.modules() if isinstance(m, Block)]:
        fully_shard(block, ignored_params=local)
    fully_shard(net, ignored_params=local)
    register_fsdp_forward_method(net, "nll")
    return shard


def pick_moe_comm(world: int, top_k: int) -> str:
    """The pattern that moves fewer bytes per token: all-gather + reduce-scatter sends a token's row to
    every other rank and its sum back, 2 (N - 1) rows; all-to-all sends it to each of its top_k experts
    and back, 2 k (N - 1) / N rows (moela.cost.formulas.alltoall_bytes_per_token). All-to-all wins past
    N = k ranks; at or below, all-gather's two plain collectives do (no counts to exchange first)."""
    return "allgather" if world <= top_k else "alltoall"


def finish_grads(net: nn.Module, world: int) -> None:
    """After backward: an expert's gradient sums every rank's tokens; FSDP's average the ranks'."""
    for p in expert_params(net).values():
        if p.grad is not None:
            p.grad.div_(world)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over FSDP shards and rank-local experts: each rank's squares summed over all ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    local = sum((g.to_local() if isinstance(g, DTensor) else g).float().square().sum() for g in grads)
    total = torch.as_tensor(local, dtype=torch.float32).clone()
    dist.all_reduce(total)
    norm = total.sqrt()
    scale = float((max_norm / (norm + 1e-6)).clamp(max=1.0))
    for g in grads:
        g.mul_(scale)
    return norm


@torch.no_grad()
def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole, on the CPU (a collective: every rank calls it)."""
    experts = expert_params(net)
    state = {}
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif name in experts:  # rank r holds experts r*E/N .. (r+1)*E/N - 1
            whole = t.new_empty(dist.get_world_size() * t.shape[0], *t.shape[1:])
            dist.all_gather_single(whole, t.detach().contiguous())
            t = whole
        state[name] = t.detach().cpu()
    return state
