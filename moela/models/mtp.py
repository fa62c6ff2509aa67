"""DeepSeek-V3 multi-token prediction (MTP): one extra block that predicts token i+2 at position i.

    mtp = build_mtp(cfg, torch.bfloat16, "cpu")            # num_nextn_predict_layers = 1
    hidden = model(tokens, ctx.positions, ctx)             # main model, final-normed [T, d]
    h2 = mtp(model, hidden_prev, next_tokens, positions, ctx2)  # [T', d] -> model.logits(h2)

For position i the module combines the main model's final hidden state h_i with the embedding of
token i+1 (embedding first in the concat), runs one full MoE Block of the same model code, and
normalizes; the embedding and output head are the main model's. `moela train` trains it alongside
the main model and stores it as layer `num_hidden_layers` of the checkpoint; the engine drafts with
it (moela/engine/speculative.py), its attention caching like any other layer's.
"""

import torch
from torch import nn

from moela.config import ModelConfig
from moela.models.context import CacheSpec, StepContext
from moela.models.deepseek import Block, Transformer
from moela.models.layers import Linear, RMSNorm, attach_layer_caches, layer_cache_specs, reset_buffers


class MTP(nn.Module):
    fp32_params = Transformer.fp32_params

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(d, eps)
        self.hnorm = RMSNorm(d, eps)
        self.eh_proj = Linear(2 * d, d)
        self.block = Block(cfg.num_hidden_layers, cfg)  # index past the dense layers: an MoE block
        self.norm = RMSNorm(d, eps)  # shared_head.norm

    def forward(self, model: Transformer, hidden: torch.Tensor, next_tokens: torch.Tensor,
                positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """hidden: h_i [T, d]; next_tokens: t_{i+1} [T]; positions: those of t_{i+1} -> [T, d]."""
        x = torch.cat([self.enorm(model.embed(next_tokens)), self.hnorm(hidden)], dim=-1)  # [T, 2d]
        cos, sin = model.rope(positions)
        return self.norm(self.block(self.eh_proj(x), cos, sin, ctx))

    def cache_specs(self) -> list[list[CacheSpec]]:
        return layer_cache_specs([self.block])

    def attach_cache(self, caches: list[dict[str, torch.Tensor]] | None) -> None:
        attach_layer_caches([self.block], caches)


def build_mtp(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> MTP:
    """An MTP module with uninitialized weights in dtype on device (the router bias in fp32), as build_model."""
    with torch.device("meta"):
        mtp = MTP(cfg).to(dtype)
    for name, t in [*mtp.named_parameters(), *mtp.named_buffers()]:
        if name.endswith(mtp.fp32_params) and t.is_floating_point():
            t.data = t.data.float()
    mtp.to_empty(device=device)
    reset_buffers(mtp)
    return mtp
