"""The DeepSeek models, math only, and the one function that builds an empty one.

    model = build_model(cfg, torch.bfloat16, "cpu")     # uninitialized weights, buffers ready
    model = build_model(cfg, torch.bfloat16, "meta")    # shapes only: plan a load, count, trace

`context.py` holds the per-step batch layout and the cache specs, `layers.py` the shared layers,
`deepseek.py` DeepSeek-V2/V3 (and Kimi K2, the same architecture).
"""

import torch

from moela.config import ModelConfig
from moela.models.context import CacheSpec, StepContext
from moela.models.deepseek import Transformer
from moela.models.layers import Gate

__all__ = ["build_model", "CacheSpec", "StepContext", "Transformer"]


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> Transformer:
    """The model for cfg with uninitialized weights in dtype on device; router biases stay fp32."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    for m in model.modules():
        if isinstance(m, Gate) and m.bias is not None:
            m.bias = m.bias.float()
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_buffers()
    return model
