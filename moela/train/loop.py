"""The training loop: moela's own model code plus MTP, DeepSeek-V3 balancing, HF-format checkpoints.

    trainer = Trainer(arch, TrainConfig(steps=1000, seq_len=256), train_windows, heldout_windows)
    while trainer.step_num < trainer.tc.steps:
        metrics = trainer.step()              # {"loss": ..., "mtp_loss": ..., "max_vio": [...], ...}
    trainer.save(path)                        # config.json + model.safetensors + optimizer/trainer state
    trainer.resume(path)                      # continues exactly where that run stopped

`arch` is a HF config.json dict (model_type deepseek_v3 or v2). Under torchrun, with torch.distributed
initialized before the Trainer is built, the model is wrapped in DDP (or, with `expert_parallel`, sharded
by FSDP2 with the routed experts split by expert: moela/train/sharded.py) and each step's global batch is
split across ranks and accumulation micro-batches, so losses match a single-process run. The data
order is a function of (seed, step) alone and there is no dropout, so resuming needs no RNG state.
"""

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moela.config import ModelConfig
from moela.errors import CheckpointError, ConfigError
from moela.loader import load_model, load_mtp, save_model
from moela.models import StepContext, Transformer
from moela.models.layers import Gate
from moela.parallel import MOE_COMM
from moela.train import sharded
from moela.train.balance import RouterMonitor, max_violation
from moela.models.mtp import MTP
from moela.train.optim import build_optimizers, lr_at, set_lr
from moela.train.report import param_counts



@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # or "muon"
    precision: str = "bf16"  # bf16 autocast, or "fp32"
    seed: int = 0
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free bias update
    balance_alpha: float = 0.0  # weight of the sequence-wise balance loss
    mtp_weight: float = 0.3  # lambda of the MTP loss
    init_std: float = 0.02
    expert_parallel: bool = False  # under torchrun: FSDP2 + routed experts split by expert over the ranks
    moe_comm: str = "auto"  # how tokens reach their experts then: "allgather", "alltoall" or "auto" (fewer bytes)


class LanguageModel(nn.Module):
    """The model and its MTP module as one module, so DDP sees every parameter; forward returns losses."""

    def __init__(self, model: Transformer, mtp: MTP | None, balance_alpha: float):
        super().__init__()
        self.model, self.mtp = model, mtp
        self.router = RouterMonitor(self, balance_alpha)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """batch [B, S + 1] -> [main loss, MTP loss, balance loss]; MTP and balance are 0 when off."""
        inp, tgt = batch[:, :-1], batch[:, 1:]
        B, S = inp.shape
        ctx = StepContext.prefill([S] * B, device=batch.device)
        hidden = self.model(inp.flatten(), ctx.positions, ctx)  # [B*S, d]
        main = F.cross_entropy(self.model.logits(hidden).float(), tgt.flatten())
        mtp = main.new_zeros(())
        if self.mtp is not None:
            # position i (< S-1): h_i and token i+1 predict token i+2
            ctx2 = StepContext.prefill([S - 1] * B, device=batch.device)
            h = hidden.view(B, S, -1)[:, :-1].flatten(0, 1)  # [B*(S-1), d]
            h2 = self.mtp(self.model, h, inp[:, 1:].flatten(), ctx2.positions + 1, ctx2)
            mtp = F.cross_entropy(self.model.logits(h2).float(), tgt[:, 1:].flatten())
        return torch.stack([main, mtp, self.router.balance_loss(B).to(main)])

    def nll(self, batch: torch.Tensor) -> torch.Tensor:
        """Summed next-token loss of the main head of each sequence of batch [B, S + 1] -> [B]."""
        inp, tgt = batch[:, :-1], batch[:, 1:]
        ctx = StepContext.prefill([inp.shape[1]] * inp.shape[0], device=batch.device)
        logits = self.model.logits(self.model(inp.flatten(), ctx.positions, ctx))
        return F.cross_entropy(logits.float(), tgt.flatten(), reduction="none").view(inp.shape).sum(dim=1)


@torch.no_grad()
def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) matrices, output projections scaled by 1/sqrt(2 n_layers), norms 1, gate biases 0."""
    for name, p in module.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0)
        else:
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight", "w2")) else 1.0
            p.normal_(0.0, std * scale)
    for m in module.modules():
        if isinstance(m, Gate) and m.bias is not None:
            m.bias.zero_()


class Sampler:
    """Global batch rows of each step; epoch e visits the windows in a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self.perms:
            self.perms = {e: p for e, p in self.perms.items() if e >= epoch - 1}
            self.perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return self.perms[epoch]

    def rows(self, step: int) -> torch.Tensor:
        ks = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self.perm(k // self.n)[k % self.n] for k in ks])


class Trainer:
    def __init__(self, arch: dict, tc: TrainConfig, train: torch.Tensor, heldout: torch.Tensor | None = None,
                 run: dict | None = None, device: str = "cpu"):
        self.arch, self.tc, self.train, self.heldout = dict(arch), tc, train, heldout
        self.cfg = cfg = ModelConfig.from_dict(self.arch)
        check_run(cfg, tc)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if tc.batch_size % (self.world * tc.grad_accum):
            raise ConfigError(f"batch size {tc.batch_size} is not divisible by world size {self.world} x grad accumulation {tc.grad_accum}")
        self.micro = tc.batch_size // (self.world * tc.grad_accum)
        self.run = {"seq_len": tc.seq_len, "batch_size": tc.batch_size, "seed": tc.seed} | (run or {})
        self.device = torch.device(device)
        torch.manual_seed(tc.seed)
        self.model = Transformer(cfg)
        self.mtp = MTP(cfg) if cfg.num_nextn_predict_layers else None
        self.net = LanguageModel(self.model, self.mtp, tc.balance_alpha).to(self.device)
        init_weights(self.net, tc.init_std, cfg.num_hidden_layers)
        self.params = param_counts(self.model, self.mtp, cfg)
        self.shard = sharded.shard_model(self.net, cfg, tc.moe_comm) if tc.expert_parallel and self.world > 1 else None
        self.ddp = DistributedDataParallel(self.net, broadcast_buffers=False) if self.world > 1 and not self.shard else None
        self.optimizers = build_optimizers(self.net.named_parameters(), tc.optimizer, tc.weight_decay)
        self.sampler = Sampler(len(train), tc.batch_size, tc.seed)
        self.step_num = 0
        self.history: dict[str, list] = {"train": [], "eval": []}  # [step, loss, mtp loss], [step, loss, sequences]

    @property
    def lr(self) -> float:
        tc = self.tc
        return lr_at(self.step_num, tc.steps, tc.lr, tc.warmup, tc.min_lr_ratio)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.tc.precision == "bf16")

    def step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics (averaged over ranks)."""
        tc = self.tc
        rows = self.sampler.rows(self.step_num).view(tc.grad_accum, self.world, self.micro)[:, self.rank]
        lr = self.lr
        set_lr(self.optimizers, lr)
        losses = torch.zeros(3)
        for m, idx in enumerate(rows):
            batch = self.train[idx].long().to(self.device)  # [micro, S + 1]
            sync = self.ddp is None or m == len(rows) - 1
            with nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    parts = (self.ddp or self.net)(batch)  # [main, mtp, balance]
                loss = (parts[0] + tc.mtp_weight * parts[1] + parts[2]) / tc.grad_accum
                loss.backward()
            losses += parts.detach().float().cpu() / tc.grad_accum
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        if self.shard:
            sharded.finish_grads(self.net, self.world)
            grad_norm = sharded.clip_grad_norm(self.net.parameters(), max_norm)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loads = self.net.router.end_step(tc.bias_update_speed)
        if self.world > 1:
            dist.all_reduce(losses)
            losses /= self.world
        self.step_num += 1
        main, mtp, balance = losses.tolist()
        self.history["train"].append([self.step_num, round(main, 5), round(mtp, 5)])
        return {"step": self.step_num, "loss": main, "mtp_loss": mtp, "balance_loss": balance, "lr": lr,
                "grad_norm": float(grad_norm), "loads": loads, "max_vio": max_violation(loads).tolist()}

    @torch.no_grad()
    def evaluate(self, max_windows: int | None = None) -> float:
        """Mean next-token loss (nats) of the main head on held-out windows; exp() is the perplexity."""
        if self.heldout is None or len(self.heldout) == 0:
            return math.nan
        chosen = self.heldout[:max_windows]
        windows = chosen[self.rank :: self.world]
        real, per_rank = len(windows), -(-len(chosen) // self.world)
        windows = torch.cat([windows, chosen[: per_rank - real]])  # equal batches on every rank (their experts meet)
        self.net.eval()
        self.net.router.active = False
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(windows), self.micro):
            batch = windows[i : i + self.micro].long().to(self.device)
            keep = max(0, min(real - i, len(batch)))  # rows past `real` are padding
            with self.autocast():
                total[0] += self.net.nll(batch)[:keep].double().sum().cpu()
            total[1] += batch[:keep, 1:].numel()
        self.net.train()
        self.net.router.active = True
        if self.world > 1:
            dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        self.history["eval"].append([self.step_num, round(loss, 5), len(chosen)])
        return loss

    def save(self, path: Path, dtype: torch.dtype | None = None, state: bool = True) -> None:
        """HF-format model at path (MTP as layer num_hidden_layers); with state, what resume() needs (with expert
        parallelism, only the history: such a run cannot be resumed yet)."""
        model, mtp = self.whole() if self.shard else (self.model, self.mtp)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            save_model(model, path, mtp, dtype, config=self.arch)
            if state and not self.shard:
                torch.save([opt.state_dict() for opt in self.optimizers], path / "optimizer.pt")
                trainer_state = {"step": self.step_num, "run": self.run, "train_config": asdict(self.tc), "history": self.history}
                (path / "trainer_state.json").write_text(json.dumps(trainer_state) + "\n", encoding="utf-8")
        if self.world > 1:
            dist.barrier()

    def whole(self) -> tuple[Transformer | None, MTP | None]:
        """Rank 0: whole CPU copies of the sharded model and MTP module (every rank must call it)."""
        state = sharded.full_state(self.net)
        if self.rank != 0:
            return None, None
        copies = (Transformer(self.cfg), MTP(self.cfg) if self.mtp is not None else None)
        for prefix, module in zip(("model.", "mtp."), copies):
            if module is not None:
                module.load_state_dict({k: state[prefix + k] for k in module.state_dict()})
        return copies

    def resume(self, path: Path) -> None:
        if self.shard:
            raise ConfigError("resuming a run with expert parallelism is not supported yet: its optimizer state "
                              "is sharded; resume without --expert-parallel")
        state = read_trainer_state(path)
        for key, value in self.run.items():
            if state["run"].get(key) != value:
                raise CheckpointError(f"{path}: cannot resume: the checkpoint was trained with {key} = "
                                      f"{state['run'].get(key)!r}, this run has {value!r}")
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        for key in sorted((set(saved) | set(self.arch)) - {"architectures", "dtype", "torch_dtype"}):
            if saved.get(key) != self.arch.get(key):
                raise CheckpointError(f"{path}: cannot resume: config field '{key}' is {saved.get(key)!r} in the "
                                      f"checkpoint but {self.arch.get(key)!r} in this run")
        self.model.load_state_dict(load_model(path, torch.float32, cfg=self.cfg).state_dict())
        if self.mtp is not None:
            load_mtp(self.mtp, path, self.cfg)
        opt_states = torch.load(path / "optimizer.pt", weights_only=True)
        try:
            assert len(opt_states) == len(self.optimizers)
            for opt, s in zip(self.optimizers, opt_states):
                opt.load_state_dict(s)
        except (AssertionError, ValueError):
            raise CheckpointError(f"{path / 'optimizer.pt'}: optimizer state does not fit this run "
                                  f"(checkpoint optimizer: {state['train_config'].get('optimizer')!r})") from None
        self.step_num, self.history = state["step"], state["history"]


def read_trainer_state(path: Path) -> dict:
    file = path / "trainer_state.json"
    if not file.is_file() or not (path / "optimizer.pt").is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no trainer_state.json / optimizer.pt); "
                              "an exported model can be loaded but not resumed")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def check_run(cfg: ModelConfig, tc: TrainConfig) -> None:
    if tc.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"sequence length {tc.seq_len} exceeds the model's max_position_embeddings "
                          f"= {cfg.max_position_embeddings}; lower --seq-len or raise it in the config")
    if tc.seq_len < 2:
        raise ConfigError(f"sequence length {tc.seq_len} must be at least 2")
    if cfg.num_nextn_predict_layers > 1:
        raise ConfigError(f"field 'num_nextn_predict_layers' = {cfg.num_nextn_predict_layers}: only one MTP module is supported")
    if tc.moe_comm not in ("auto", *MOE_COMM):
        raise ConfigError(f"moe_comm {tc.moe_comm!r}: expected auto, {' or '.join(MOE_COMM)}")
    if tc.optimizer not in ("adamw", "muon") or tc.precision not in ("bf16", "fp32"):
        raise ConfigError(f"optimizer {tc.optimizer!r} / precision {tc.precision!r}: expected adamw|muon and bf16|fp32")
