"""The ranks of a tensor- or expert-parallel engine, on torch.distributed. Rank 0 schedules, samples and
serves; before each forward it broadcasts the step (tokens and batch layout) and every other rank runs
the same forward on its part of the model (moela/parallel.py), the layers' all-reduces joining them.

    LLM(model=path, tensor_parallel_size=4, enable_expert_parallel=True)   # spawns ranks 1-3 here
    torchrun --nnodes 2 --nproc-per-node 4 ... -m moela.cli serve DIR --tensor-parallel-size 8   # across machines

Not under torchrun, LLMEngine starts ranks 1..N-1 itself (torch.multiprocessing, spawn), each building its
own engine and following. Under torchrun (RANK and WORLD_SIZE set) every process runs the same command:
rank 0 returns from LLM() or serves, the others follow (`follow_forever`) and exit when rank 0 closes.
Two process groups: the default one (gloo on CPU, nccl on CUDA, hccl on Ascend) carries the forward's
collectives, with `distributed_timeout`; a gloo group carries the step broadcasts with no practical
timeout, since the followers wait there while the engine is idle. A rank that dies closes its
connections, so its peers' next collective fails and they exit with a RankError; one that stalls
fails them after the timeout.
"""

import os
import socket
import sys
import threading
import time
import weakref
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moela.config import ModelConfig

from moela.engine.config import EngineConfig
from moela.models import StepContext
from moela.parallel import Mesh, RankError, Shard, reason
from moela.placement import Placement

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
IDLE = timedelta(days=30)  # how long followers wait for rank 0's next step
STEP_TENSORS = ("positions", "slot_mapping", "block_tables", "seq_slots")


class Ranks:
    def __init__(self, rank: int, world: int, local_world: int, procs: list | None = None, owned: bool = False):
        self.rank, self.world, self.local_world, self.procs, self.owned = rank, world, local_world, procs or [], owned
        self.control = dist.new_group(backend="gloo", timeout=IDLE)
        self.closed = False

    @classmethod
    def start(cls, cfg: EngineConfig) -> "Ranks":
        """Join the process group: an existing one, torchrun's, or one with ranks spawned here."""
        n = cfg.tensor_parallel_size
        if dist.is_initialized() or "RANK" in os.environ:
            if not dist.is_initialized():
                dist.init_process_group(DIST_BACKENDS.get(torch.device(cfg.device).type, "gloo"),
                                        timeout=timedelta(seconds=cfg.distributed_timeout))
            if dist.get_world_size() != n:
                raise RankError(f"tensor_parallel_size = {n} but the process group has {dist.get_world_size()} "
                                "ranks (torchrun's --nnodes x --nproc-per-node must equal it)")
            return cls(dist.get_rank(), n, int(os.environ.get("LOCAL_WORLD_SIZE", n)), owned="RANK" in os.environ)
        port, spawn = free_port(), mp.get_context("spawn")
        procs = [spawn.Process(target=_spawned, args=(rank, cfg, port, os.getpid()), daemon=True, name=f"moela-rank-{rank}")
                 for rank in range(1, n)]
        for p in procs:
            p.start()
        init(cfg, 0, port)
        return cls(0, n, n, procs, owned=True)

    def local_config(self, cfg: EngineConfig) -> EngineConfig:
        """This rank's device (cuda -> cuda:LOCAL_RANK) and, on a CPU, its share of the cores."""
        device, local = torch.device(cfg.device), self.rank % self.local_world
        if device.type != "cpu" and device.index is None:
            cfg = replace(cfg, device=f"{device.type}:{local}")
        elif device.type == "cpu" and not isinstance(cfg.threads, int):
            cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // self.local_world))
        return cfg

    def shard(self, cfg: EngineConfig, model_cfg: ModelConfig) -> Shard:
        ep = cfg.expert_parallel_size or (self.world if cfg.enable_expert_parallel else 1)
        plan = Placement.load(cfg.expert_placement) if cfg.expert_placement else None
        return Shard(Mesh(self.rank, self.world, ep), model_cfg, plan)

    def agree(self, num_blocks: int) -> int:
        """The cache blocks every rank can hold (all ranks must page the same blocks)."""
        t = torch.tensor([num_blocks])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def lead(self, engine) -> None:
        """Rank 0: broadcast each step before the model's forward; stop the others when the engine goes."""
        if self.rank == 0:
            engine.model.register_forward_pre_hook(self._send_step)
            weakref.finalize(engine, self.shutdown)

    def _send_step(self, model: torch.nn.Module, args: tuple) -> None:
        tokens, _, ctx = args
        step = {name: getattr(ctx, name) for name in STEP_TENSORS} | {"tokens": tokens}
        step = {k: None if t is None else t.cpu() for k, t in step.items()}
        self._broadcast(step | {"q_lens": ctx.q_lens, "kv_lens": ctx.kv_lens, "block_size": ctx.block_size,
                                "naive_prefill": ctx.naive_prefill})

    def _broadcast(self, message: dict | None) -> dict | None:
        box = [message]
        try:
            dist.broadcast_object_list(box, src=0, group=self.control)
        except RuntimeError as e:
            gone = "".join(f"; rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in enumerate(self.procs, 1)
                           if p.exitcode is not None)
            raise RankError(f"rank {self.rank}: lost contact with the other ranks ({reason(e)}){gone}") from None
        return box[0]

    @torch.inference_mode()
    def follow(self, engine) -> None:
        """Ranks > 0: run rank 0's forwards until it stops."""
        while (step := self._broadcast(None)) is not None:
            on_device = {k: None if step[k] is None else step[k].to(engine.device) for k in (*STEP_TENSORS, "tokens")}
            ctx = StepContext(q_lens=step["q_lens"], kv_lens=step["kv_lens"], block_size=step["block_size"],
                              naive_prefill=step["naive_prefill"], **{k: on_device[k] for k in STEP_TENSORS})
            engine.backend.plan(ctx)
            engine.model(on_device["tokens"], ctx.positions, ctx)

    def shutdown(self) -> None:
        """Rank 0 tells the others to stop; the ranks spawned here are joined; an owned group is destroyed."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0:
            try:
                self._broadcast(None)
            except RankError:
                pass  # a rank is gone already
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def init(cfg: EngineConfig, rank: int, port: int) -> None:
    dist.init_process_group(DIST_BACKENDS.get(torch.device(cfg.device).type, "gloo"), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=cfg.tensor_parallel_size, timeout=timedelta(seconds=cfg.distributed_timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_follower(cfg: EngineConfig) -> bool:
    """A rank > 0 that torchrun started: it follows rank 0 instead of serving or returning an LLM."""
    return cfg.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0


def follow_forever(cfg: EngineConfig) -> None:
    """Build this rank's engine and run rank 0's steps until it closes."""
    from moela.engine.llm import LLMEngine  # the engine builds Ranks: imported here, not at the top

    engine = LLMEngine(cfg)
    try:
        engine.ranks.follow(engine)
    finally:
        engine.ranks.shutdown()


def _spawned(rank: int, cfg: EngineConfig, port: int, parent: int) -> None:
    """A local rank started by rank 0."""
    exit_with_parent(rank, parent)
    try:
        init(cfg, rank, port)
        follow_forever(cfg)
    except RankError as e:
        print(f"moela: {e}; exiting", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_with_parent(rank: int, parent: int) -> None:
    """End this process, saying why, within a second of rank 0's process ending: a spawned rank may be
    waiting on rank 0 where no error reaches it (joining the process group, loading)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"moela: rank {rank}: lost contact with the other ranks (rank 0, pid {parent}, exited); exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="moela-rank-0-watch").start()
