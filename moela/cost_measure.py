"""Calibrate the cost model: time moela's own decode on this machine and set it beside the roofline.

    from moela.cost_catalog import load_model
    from moela.cost_measure import measure_decode
    measure_decode(load_model("bench-1b"), batch=1, context=128)
    # {"tokens_per_s": 21.3, "roofline_tokens_per_s": 45.0, "ratio": 0.47, ...}

Builds the model with random bf16 weights (uniform-looking routing, which is what the roofline's
expected-experts formula assumes), prefills `batch` random prompts of `context` tokens, then times
`steps` single-token decode steps through the absorbed path and the paged latent cache.
"""

import os
import time

import torch

from moela import cost
from moela.config import MODEL_TYPES, ModelConfig
from moela.cost_catalog import CatalogModel, measure_local
from moela.generate import BatchDecoder
from moela.model import Gate, Transformer

MAX_MEMORY_SHARE = 0.5  # refuse shapes whose bf16 weights need more than this share of RAM


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A bf16 model on the CPU with N(0, 0.02) matrices and unit norms."""
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, Gate) and m.bias is not None:
            m.bias = torch.zeros(cfg.n_routed_experts)  # fp32, as the loader keeps it
    model.init_rope()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def _check_runnable(m: CatalogModel) -> ModelConfig:
    if m.config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"--measure runs moela's model, which supports {', '.join(MODEL_TYPES)}; "
                         f"{m.key} is {m.config.get('model_type')} (try bench-1b)")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = cost.weight_bytes(m.shape, "bf16")
    if need > MAX_MEMORY_SHARE * ram:
        raise ValueError(f"--measure builds {m.key} in bf16 here: {need / 1e9:.1f} GB of weights, more than "
                         f"{MAX_MEMORY_SHARE:.0%} of this machine's {ram / 1e9:.1f} GB (try bench-1b)")
    return ModelConfig.from_dict(m.config)


def measure_decode(m: CatalogModel, batch: int, context: int, steps: int = 16) -> dict:
    cfg = _check_runnable(m)
    hw = measure_local()
    model = random_model(cfg)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).tolist()
    dec = BatchDecoder(model, batch, context + steps + 1)
    dec.step(prompts)  # prefill, untimed
    tokens = [[t] for t in torch.randint(0, cfg.vocab_size, (batch,), generator=gen).tolist()]
    dec.step(tokens)  # first decode step warms up the absorbed path
    start = time.perf_counter()
    for _ in range(steps):
        dec.step(tokens)
    seconds = (time.perf_counter() - start) / steps
    mid = context + 1 + steps // 2  # mean context over the timed steps
    roof = cost.decode_roofline(m.shape, hw, batch, mid, "bf16", devices=1)
    measured = batch / seconds
    return {"model": m.key, "hardware": hw.name, "bandwidth_gbs": hw.bandwidth_tbs * 1e3,
            "tflops": hw.tflops["bf16"], "batch": batch, "context": context, "steps": steps,
            "threads": torch.get_num_threads(), "tokens_per_s": measured,
            "roofline_tokens_per_s": roof.tokens_per_s, "bound": roof.bound,
            "ratio": measured / roof.tokens_per_s}
