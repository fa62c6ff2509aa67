"""What `moela train` leaves next to a model: the loss-curve PNG and the model card (README.md).

    plot_losses(trainer.history, path / "loss_curve.png")
    (path / "README.md").write_text(model_card(facts))
"""

import math
from pathlib import Path

import torch

from moela.config import ModelConfig


def plot_losses(history: dict[str, list], path: Path) -> None:
    """Train loss (and MTP loss, held-out loss when present) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    train = history["train"]
    if train:
        steps = [r[0] for r in train]
        ax.plot(steps, _smooth([r[1] for r in train]), label="train loss", lw=1.2)
        if any(r[2] for r in train):
            ax.plot(steps, _smooth([r[2] for r in train]), label="MTP loss (token i+2)", lw=1.0, alpha=0.7)
    periodic = [r for r in history["eval"] if r[2] == history["eval"][0][2]]
    if periodic:
        ax.plot([r[0] for r in periodic], [r[1] for r in periodic], "o-", ms=3, label=f"held-out loss ({periodic[0][2]} sequences)")
    for step, loss, n in (r for r in history["eval"] if r not in periodic):
        ax.plot([step], [loss], "*", ms=10, color="C3", label=f"held-out loss (all {n} sequences)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def param_counts(model: torch.nn.Module, mtp: torch.nn.Module | None, cfg: ModelConfig) -> dict[str, int]:
    """Total parameters of the main model, of the MTP module, and those active per token (main model)."""
    total = sum(p.numel() for p in model.parameters())
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    idle = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    mtp_total = sum(p.numel() for p in mtp.parameters()) if mtp is not None else 0
    return {"total": total, "active": total - idle if cfg.has_moe else total, "mtp": mtp_total}


def model_card(f: dict) -> str:
    """README.md for a trained model from the facts the CLI gathered (keys used below)."""
    cfg: ModelConfig = f["cfg"]
    p = f["params"]
    ppl = math.exp(f["heldout_loss"]) if math.isfinite(f["heldout_loss"]) else math.nan
    vio = ", ".join(f"{v:.2f}" for v in f["max_vio"])
    usage = ("It is moela's embedded default model: `moela generate` uses it when no `--model` is given."
             if f["is_default"] else f"Run it with `moela generate --model {f['out']} \"...\"`.")
    return f"""# {f['title']}

A small DeepSeek-V3-architecture model (MLA, DeepSeekMoE with aux-loss-free balancing, one MTP
module) trained from scratch by `moela train` on {f['corpus_desc']}.
{usage} It is a demonstration and test fixture, not a useful assistant.

## Reproduce

```
{f['command']}
```

Run from the repository root; {f['hardware']}. Data order and initialization depend only on
`--seed`, so the run is reproducible up to floating-point differences between machines.

## Architecture (`config.json`, model_type `deepseek_v3`)

| | |
|---|---|
| layers | {cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense, {cfg.num_hidden_layers - cfg.first_k_dense_replace} MoE) + 1 MTP layer |
| hidden size | {cfg.hidden_size} |
| MLA | {cfg.num_attention_heads} heads, q_lora_rank {cfg.q_lora_rank}, kv_lora_rank {cfg.kv_lora_rank}, qk dims {cfg.qk_nope_head_dim} nope + {cfg.qk_rope_head_dim} rope, v {cfg.v_head_dim} |
| MoE | {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared experts of width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, sigmoid router with e_score_correction_bias (noaux_tc, {cfg.n_group} groups / top {cfg.topk_group}) |
| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the training files) |
| context | {f['seq_len']} tokens trained (max_position_embeddings {cfg.max_position_embeddings}) |
| parameters | {p['total'] / 1e6:.2f}M main model ({p['active'] / 1e6:.2f}M active per token) + {p['mtp'] / 1e6:.2f}M MTP; stored as bf16 ({f['size_mb']:.1f} MB) |

## Training

- Data: {f['n_train_files']} training files, {f['train_tokens'] / 1e6:.2f}M tokens; {f['n_heldout_files']} held-out files
  ({f['heldout_tokens'] / 1e3:.0f}k tokens), chosen by a hash of each file's relative path.
- {f['steps']} steps x {f['batch_size']} sequences x {f['seq_len']} tokens = {f['tokens_seen'] / 1e6:.2f}M tokens
  ({f['epochs']:.2f} epochs), {f['optimizer']}, peak lr {f['lr']}, warmup + cosine, {f['precision']}, MTP loss weight
  {f['mtp_weight']}, bias update speed {f['bias_update_speed']}, sequence-wise balance loss alpha {f['balance_alpha']}.
- Wall time {f['wall_min']:.1f} min for the whole command (data preparation, training, evaluation).

## Results

| | |
|---|---|
| final train loss (mean of the last 20 steps) | {f['train_loss']:.3f} nats/token |
| held-out loss | {f['heldout_loss']:.3f} nats/token |
| **held-out perplexity** | **{ppl:.2f}** |
| expert load MaxVio per MoE layer at the end (last MTP) | {vio} |

![loss curve](loss_curve.png)

## Sample

`moela generate{'' if f['is_default'] else ' --model ' + str(f['out'])} --temperature 0 "{f['sample_prompt']}"` (greedy, up to 96
tokens, {f['sample_dtype']} on the {f['sample_backend']} backend):

```python
{f['sample_prompt']}{f['sample']}
```
"""
