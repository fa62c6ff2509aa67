"""The DeepSeek models, math only, and the one function that builds an empty one.

    model = build_model(cfg, torch.bfloat16, "cpu")     # uninitialized weights, buffers ready
    model = build_model(cfg, torch.bfloat16, "meta")    # shapes only: plan a load, count, trace

`context.py` holds the per-step batch layout and the cache specs, `layers.py` the shared layers,
`deepseek.py` DeepSeek-V2/V3 (and Kimi K2, the same architecture), `deepseek_v32.py` V3.2's sparse
attention on top of it, `deepseek_v4.py` V4.
"""

import torch

from moela.config import ModelConfig
from moela.models import deepseek, deepseek_v4, deepseek_v32
from moela.models.context import CacheSpec, StepContext
from moela.models.deepseek import Transformer

__all__ = ["build_model", "CacheSpec", "StepContext", "Transformer"]


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> Transformer:
    """The model for cfg with uninitialized weights in dtype on device; the tensors the model lists in
    `fp32_params` (router biases; V4's norms, sinks, mHC) stay fp32."""
    model_class = {"deepseek_v32": deepseek_v32.Transformer, "deepseek_v4": deepseek_v4.Transformer}.get(
        cfg.model_type, deepseek.Transformer)
    with torch.device("meta"):
        model = model_class(cfg).to(dtype)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(model.fp32_params) and t.is_floating_point():
            t.data = t.data.float()
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_buffers()
    return model
