"""`moela train`: train a DeepSeek-architecture model on a directory of text files.

    moela train --out runs/tiny --steps 200                      # stdlib *.py, default architecture
    moela train --out runs/tiny --config my_config.json --corpus ~/src --glob "*.py"
    moela train --out runs/tiny --resume runs/tiny/checkpoints/step-000100 --steps 400
    torchrun --nproc-per-node 2 -m moela.train.cli --out runs/ddp --steps 200   # same run, 2 ranks (gloo on CPU)
    torchrun --nproc-per-node 4 -m moela.train.cli --out runs/ep --expert-parallel   # FSDP2 + experts split by expert

Without --config the architecture is that of the embedded default model
(moela/assets/default-model/config.json); vocab_size and bos/eos ids always come from the tokenizer
trained on the corpus's training files. Checkpoints (HF format plus optimizer and trainer state, a
loss-curve PNG beside each) go to --checkpoint-dir; the final model, its tokenizer, loss curve and
model card go to --out.
"""

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from moela import threads
from moela.config import DEFAULT_MODEL_DIR, DTYPES, HelpFormatter, ModelConfig
from moela.errors import MoelaError
from moela.train import data
from moela.train.loop import Trainer, TrainConfig, check_run, read_trainer_state
from moela.train.report import model_card, plot_losses

DEFAULT_CONFIG = DEFAULT_MODEL_DIR / "config.json"
log = logging.getLogger("moela.train")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moela train", description="Train a DeepSeek-architecture model (MLA + MoE + MTP).",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for the final model")
    p.add_argument("--config", type=Path, default=None, help="HF config.json with the architecture (default: the embedded model's)")
    p.add_argument("--corpus", type=Path, action="append", help="file or directory (repeatable; default: this Python's stdlib)")
    p.add_argument("--glob", default="*.py", help="file pattern inside corpus directories")
    p.add_argument("--exclude", action="append", default=list(data.DEFAULT_EXCLUDE), help="relative-path pattern to skip (repeatable)")
    p.add_argument("--strip-docstrings", action="store_true",
                   help="drop the docstrings of .py files, training and held-out alike (comments stay): after a `def` comes code")
    p.add_argument("--holdout", type=float, default=0.02, help="fraction of files held out for evaluation")
    p.add_argument("--vocab-size", type=int, default=6144, help="tokens of the byte-level BPE trained on the corpus")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (all ranks)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine decay)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a share of --lr")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 100, at most a tenth of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay of matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="muon for matrices, AdamW for the rest")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or plain fp32")
    p.add_argument("--seed", type=int, default=0, help="sets the initialization and the data order")
    p.add_argument("--bias-update-speed", type=float, default=1e-3, help="gamma of the aux-loss-free bias update")
    p.add_argument("--balance-alpha", type=float, default=0.0, help="weight of the sequence-wise balance loss")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out sequences per periodic evaluation (the final one uses all)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: OUT/checkpoints")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint directory to continue from")
    p.add_argument("--save-dtype", choices=DTYPES, default="bfloat16", help="dtype of the final model")
    p.add_argument("--sample-prompt", default="def fibonacci(n):", help="prompt of the greedy sample in the model card")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: shard weights with FSDP2 and split the routed experts by expert over the ranks")
    p.add_argument("--moe-comm", choices=("auto", "allgather", "alltoall"), default="auto",
                   help="with --expert-parallel: how tokens reach their experts; auto moves fewer bytes (docs/distributed.md)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to train on")
    p.add_argument("--threads", type=threads.argument, default="auto",
                   help="CPU threads: a number, or auto (the cores free now, fewer when another process takes one)")
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=min(100, args.steps // 10) if args.warmup is None else args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        optimizer=args.optimizer, precision=args.precision, seed=args.seed, bias_update_speed=args.bias_update_speed,
        balance_alpha=args.balance_alpha, mtp_weight=args.mtp_weight, expert_parallel=args.expert_parallel,
        moe_comm=args.moe_comm)


def read_arch(args: argparse.Namespace) -> dict:
    """The architecture: --config, else the resumed checkpoint's, else the embedded default model's."""
    if args.resume:
        read_trainer_state(args.resume)  # fail early on a directory that is not a checkpoint
    file = args.config or (args.resume / "config.json" if args.resume else DEFAULT_CONFIG)
    ModelConfig.from_pretrained(file)  # clear errors for a missing or invalid file
    arch = json.loads(file.read_text(encoding="utf-8"))
    return {k: v for k, v in arch.items() if k not in ("architectures", "dtype", "torch_dtype")}


def load_tokenizer(args: argparse.Namespace, train_texts: list[str], rank: int, max_len: int) -> Tokenizer:
    """The resumed checkpoint's tokenizer, or a new BPE trained by rank 0 and shared through --out."""
    if args.resume:
        return Tokenizer.from_file(str(args.resume / "tokenizer.json"))
    if rank == 0:
        say(rank, f"training a {args.vocab_size}-token byte-level BPE on {len(train_texts)} files ...")
        tok = data.train_tokenizer(train_texts, args.vocab_size)
        if tok.get_vocab_size() < args.vocab_size:
            say(rank, f"warning: the tokenizer has {tok.get_vocab_size()} tokens, fewer than --vocab-size "
                      f"{args.vocab_size}: the training files hold no more merges to learn (a larger corpus gives "
                      f"more); the model's vocab_size is {tok.get_vocab_size()}")
        data.save_tokenizer(tok, args.out, max_len)
    if dist.is_initialized():
        dist.barrier()
    return Tokenizer.from_file(str(args.out / "tokenizer.json"))


def prepare(args: argparse.Namespace, tc: TrainConfig, rank: int) -> tuple[dict, Tokenizer, dict, dict]:
    """(arch, tokenizer, {train, heldout} windows, facts about the corpus)."""
    arch = read_arch(args)
    cfg = ModelConfig.from_dict(arch)
    check_run(cfg, tc)  # a bad --seq-len fails before any tokenizing
    roots = args.corpus or [data.stdlib_dir()]
    say(rank, f"reading {args.glob} files under {', '.join(map(str, roots))} ...")
    files = data.find_files(roots, args.glob, tuple(args.exclude))
    train_files, heldout_files = data.split_files(files, args.holdout)
    keep = not args.strip_docstrings
    train_texts, heldout_texts = data.read_texts(train_files, keep), data.read_texts(heldout_files, keep)
    tok = load_tokenizer(args, train_texts, rank, cfg.max_position_embeddings)
    arch |= {"vocab_size": tok.get_vocab_size(), "bos_token_id": tok.token_to_id(data.BOS),
             "eos_token_id": tok.token_to_id(data.EOS)}
    say(rank, f"tokenizing and packing into sequences of {tc.seq_len} ...")
    windows = {"train": data.pack(tok, train_texts, tc.seq_len), "heldout": None}
    try:
        windows["heldout"] = data.pack(tok, heldout_texts, tc.seq_len)
    except data.CorpusError:
        log.warning("held-out files hold less than one sequence: no held-out evaluation")
    facts = {"corpus_desc": ", ".join(map(str, roots)), "n_train_files": len(train_texts),
             "n_heldout_files": len(heldout_texts), "fingerprint": data.fingerprint(train_files, keep)}
    return arch, tok, windows, facts


def save_checkpoint(trainer: Trainer, tok: Tokenizer, path: Path, dtype: torch.dtype | None = None, state: bool = True) -> None:
    trainer.save(path, dtype, state)
    if trainer.rank == 0:
        data.save_tokenizer(tok, path, trainer.cfg.max_position_embeddings)
        plot_losses(trainer.history, path / "loss_curve.png")


def run(args: argparse.Namespace) -> int:
    start, tc = time.perf_counter(), train_config(args)
    args.governor = threads.apply(args.threads)
    rank = dist.get_rank() if dist.is_initialized() else 0
    args.out.mkdir(parents=True, exist_ok=True)
    arch, tok, windows, facts = prepare(args, tc, rank)
    run_id = {"corpus": facts["fingerprint"], "holdout": args.holdout}
    trainer = Trainer(arch, tc, windows["train"], windows["heldout"], run=run_id, device=args.device)
    if args.resume:
        trainer.resume(args.resume)
    n = trainer.params
    say(rank, f"{facts['n_train_files']} training files -> {len(windows['train']) * tc.seq_len / 1e6:.2f}M tokens in "
              f"{len(windows['train'])} sequences of {tc.seq_len}; vocab {arch['vocab_size']}; {n['total'] / 1e6:.2f}M "
              f"parameters ({n['active'] / 1e6:.2f}M active) + MTP {n['mtp'] / 1e6:.2f}M; warmup {tc.warmup} of {tc.steps} steps; starting at step {trainer.step_num}")
    ckpt_dir = args.checkpoint_dir or args.out / "checkpoints"
    max_vio = train_loop(args, trainer, tok, ckpt_dir, rank)
    if windows["heldout"] is not None:
        say(rank, f"final evaluation on all {len(windows['heldout'])} held-out sequences ...")
    heldout_loss = trainer.evaluate()
    say(rank, f"final held-out loss {heldout_loss:.4f} (perplexity {torch.tensor(heldout_loss).exp():.2f})")
    save_checkpoint(trainer, tok, args.out, DTYPES[args.save_dtype], state=False)
    if rank == 0:
        facts |= {"heldout_loss": heldout_loss, "wall_min": (time.perf_counter() - start) / 60, "max_vio": max_vio}
        (args.out / "README.md").write_text(model_card(card_facts(args, trainer, windows, facts)), encoding="utf-8")
    return 0


def train_loop(args: argparse.Namespace, trainer: Trainer, tok: Tokenizer, ckpt_dir: Path, rank: int) -> list[float]:
    """Steps until tc.steps with a progress bar, logs, evaluations and checkpoints; returns the last MaxVio."""
    tc = trainer.tc
    bar = tqdm(total=tc.steps, initial=trainer.step_num, unit="step", disable=rank != 0, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    tokens, busy, max_vio = 0, 0.0, []
    while trainer.step_num < tc.steps:
        t0 = time.perf_counter()
        m = trainer.step()
        if args.governor is not None:
            args.governor.tick()
        tokens, busy, max_vio = tokens + tc.batch_size * tc.seq_len, busy + time.perf_counter() - t0, m["max_vio"]
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_loss']:.3f}", tok_s=f"{tokens / busy:,.0f}", refresh=False)
        step = m["step"]
        if step % args.log_every == 0 or step == tc.steps:
            vio = " ".join(f"{v:.2f}" for v in max_vio)
            say(rank, f"step {step}/{tc.steps} loss {m['loss']:.4f} mtp {m['mtp_loss']:.4f} balance {m['balance_loss']:.2e} "
                      f"lr {m['lr']:.2e} grad {m['grad_norm']:.2f} {tokens / busy:,.0f} tok/s | expert load MaxVio per MoE layer: {vio}")
            tokens, busy = 0, 0.0
        if step % args.eval_every == 0 and step < tc.steps:
            loss = trainer.evaluate(args.eval_windows)
            say(rank, f"step {step} held-out loss {loss:.4f} (first {args.eval_windows} held-out sequences)")
        if step % args.save_every == 0 or step == tc.steps:
            save_checkpoint(trainer, tok, ckpt_dir / f"step-{step:06d}")
    bar.close()
    return max_vio


def card_facts(args: argparse.Namespace, trainer: Trainer, windows: dict, facts: dict) -> dict:
    """Everything model_card() prints: the command, corpus, architecture, budget and results."""
    from moela.engine.llm import LLM
    from moela.engine.sampler import SamplingParams

    tc, heldout = trainer.tc, windows["heldout"]
    if not args.corpus:
        facts["corpus_desc"] = (f"the Python {platform.python_version()} standard library source (`{args.glob}` files "
                                f"under `{data.stdlib_dir()}`, skipping {', '.join(f'`{e}`' for e in args.exclude)})")
    if args.strip_docstrings:
        facts["corpus_desc"] += ", docstrings stripped (`--strip-docstrings`)"
    llm = LLM(model=args.out, max_num_seqs=1)  # what `moela generate` runs (dtype auto)
    room = trainer.cfg.max_position_embeddings - len(llm.get_tokenizer().encode(args.sample_prompt))
    sample = llm.generate([args.sample_prompt], SamplingParams(temperature=0, max_tokens=min(96, room)))[0].outputs[0].text
    last = [r[1] for r in trainer.history["train"][-20:]]
    files = [f for f in args.out.iterdir() if f.is_file()]
    return facts | {
        "title": f"moela {args.out.name}", "out": args.out, "is_default": args.out.resolve() == DEFAULT_MODEL_DIR.resolve(),
        "command": "moela train " + shlex.join(args.argv),
        "hardware": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, device {args.device}",
        "cfg": trainer.cfg, "params": trainer.params,
        "size_mb": sum(f.stat().st_size for f in files) / 1e6, "seq_len": tc.seq_len,
        "train_tokens": len(windows["train"]) * tc.seq_len, "heldout_tokens": 0 if heldout is None else len(heldout) * tc.seq_len,
        "steps": trainer.step_num, "batch_size": tc.batch_size, "tokens_seen": trainer.step_num * tc.batch_size * tc.seq_len,
        "epochs": trainer.step_num * tc.batch_size / len(windows["train"]), "optimizer": tc.optimizer, "lr": tc.lr,
        "precision": tc.precision, "mtp_weight": tc.mtp_weight, "bias_update_speed": tc.bias_update_speed,
        "balance_alpha": tc.balance_alpha, "train_loss": sum(last) / max(1, len(last)),
        "sample_prompt": args.sample_prompt, "sample": sample,
        "sample_dtype": str(llm.engine.model.embed.weight.dtype).removeprefix("torch."), "sample_backend": llm.engine.backend.name,
    }


def say(rank: int, message: str) -> None:
    if rank == 0:
        tqdm.write(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv  # for the model card's reproduce command
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        if distributed:
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        return run(args)
    except MoelaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
