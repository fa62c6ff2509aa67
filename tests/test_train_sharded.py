"""Training with FSDP2 plus expert parallelism (moela/train/sharded.py) on 2 gloo ranks: the same losses,
gradient norms, held-out loss and saved model as one process, with both ways of moving tokens."""

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moela.errors import ConfigError
from moela.train.loop import Trainer, TrainConfig
from test_parallel import run_ranks
from test_train import ARCH, FAST

STEPS = 2


def windows() -> torch.Tensor:
    return torch.randint(2, 300, (28, 17), generator=torch.Generator().manual_seed(0))


def run(out: Path, **kwargs) -> tuple[list, float]:
    """STEPS steps and a held-out evaluation (20 train windows, 8 held out) -> ([(loss, mtp, grad norm)], eval)."""
    w = windows()
    trainer = Trainer(ARCH, TrainConfig(**FAST, balance_alpha=1e-2, **kwargs), w[:20], w[20:])
    history = []
    for _ in range(STEPS):
        m = trainer.step()
        history.append((m["loss"], m["mtp_loss"], m["grad_norm"]))
    heldout = trainer.evaluate(7)  # 7 windows: the second rank has one fewer, so it pads
    trainer.save(out, state=False)
    if trainer.shard:
        with pytest.raises(ConfigError, match="resuming a run with expert parallelism is not supported"):
            trainer.resume(out)
    return history, heldout


def _worker(rank: int, world: int, port: int, root: Path, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for comm in ("allgather", "alltoall"):
            result = run(root / comm, expert_parallel=True, moe_comm=comm)
            if rank == 0:
                results.put((comm, result))
    finally:
        dist.destroy_process_group()


def test_fsdp2_with_expert_parallelism_matches_one_process(tmp_path):
    sharded = dict(run_ranks(_worker, 2, (tmp_path,), 2))
    history, heldout = run(tmp_path / "single")
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    for comm, (h, e) in sharded.items():
        flat = [x for step in h for x in step]
        assert flat == pytest.approx([x for step in history for x in step], abs=2e-5), comm
        assert e == pytest.approx(heldout, abs=2e-5), comm
        saved = load_file(str(tmp_path / comm / "model.safetensors"))
        assert saved.keys() == single.keys()
        assert all(torch.allclose(saved[k].float(), single[k].float(), atol=1e-5) for k in single), comm


def test_auto_picks_the_pattern_that_moves_fewer_bytes():
    from moela.cost.catalog import load_model
    from moela.cost.formulas import alltoall_bytes_per_token
    from moela.train.sharded import pick_moe_comm

    v3 = load_model("v3").shape  # top-8
    for world in (2, 8, 16, 64):
        gather_bytes = 2 * (world - 1) * v3.hidden_size * 2  # every other rank gets the row, and its sum comes back
        fewer = "allgather" if gather_bytes <= alltoall_bytes_per_token(v3, world, "bf16") else "alltoall"
        assert pick_moe_comm(world, 8) == fewer
