"""DeepSeek-V3 multi-token prediction (MTP): one extra block that predicts token i+2 at position i.

    mtp = MTP(cfg)                                     # num_nextn_predict_layers = 1
    hidden = model(tokens, ctx.positions, ctx)         # main model, final-normed [T, d]
    h2 = mtp(model, hidden_prev, next_tokens, positions, ctx2)  # [T', d] -> model.logits(h2)

For position i the module combines the main model's final hidden state h_i with the embedding of
token i+1 (embedding first in the concat), runs one full MoE Block of the same model code, and
normalizes; the embedding and output head are the main model's. It is trained alongside the main
model (its loss weighted by `mtp_weight`) and stored as layer `num_hidden_layers` of the checkpoint.
"""

import torch
from torch import nn

from moela.config import ModelConfig
from moela.models import StepContext, Transformer
from moela.models.deepseek import Block
from moela.models.layers import RMSNorm


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(d, eps)
        self.hnorm = RMSNorm(d, eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg.num_hidden_layers, cfg)  # index past the dense layers: an MoE block
        self.norm = RMSNorm(d, eps)  # shared_head.norm

    def forward(self, model: Transformer, hidden: torch.Tensor, next_tokens: torch.Tensor,
                positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """hidden: h_i [T, d]; next_tokens: t_{i+1} [T]; positions: those of t_{i+1} -> [T, d]."""
        x = torch.cat([self.enorm(model.embed(next_tokens)), self.hnorm(hidden)], dim=-1)  # [T, 2d]
        cos, sin = model.rope(positions)
        return self.norm(self.block(self.eh_proj(x), cos, sin, ctx))
