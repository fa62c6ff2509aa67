"""Calibrate the cost model: time moela's own decode on this machine and set it beside the roofline.

    from moela.cost_catalog import load_model
    from moela.cost_measure import measure_decode
    measure_decode(load_model("bench-1b"), batch=1, context=128)
    # {"tokens_per_s": 21.3, "roofline_tokens_per_s": 45.0, "ratio": 0.47, ...}

Builds the model with random bf16 weights (uniform-looking routing, which is what the roofline's
expected-experts formula assumes), gives moela's engine `batch` random prompts of `context` tokens,
then times `steps` engine steps in which every sequence decodes one token (scheduling, the absorbed
MLA path over the paged latent cache, sampling).
"""

import math
import os
import time

import torch

from moela import cost
from moela.config import MODEL_TYPES, ModelConfig
from moela.cost_catalog import CatalogModel, measure_local
from moela.engine.llm import EngineConfig, LLMEngine
from moela.model import Gate, Transformer
from moela.sampling import SamplingParams

MAX_MEMORY_SHARE = 0.5  # refuse shapes whose bf16 weights need more than this share of RAM


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A bf16 model on the CPU with N(0, 0.02) matrices and unit norms."""
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, Gate) and m.bias is not None:
            m.bias = torch.zeros(cfg.n_routed_experts)  # fp32, as the loader keeps it
    model.init_buffers()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
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


def _time_decode(model: Transformer, batch: int, context: int, steps: int, block: int = 64) -> float:
    """Seconds per engine step once every sequence decodes (prefill and one warm-up step untimed)."""
    max_len = context + steps + 2
    per_token = model.cfg.latent_dim * model.cfg.num_hidden_layers * 2  # bf16 latent cache
    cache = batch * (math.ceil(max_len / block) + 1) * block * per_token
    cfg = EngineConfig(max_model_len=max_len, max_num_seqs=batch, skip_tokenizer_init=True, block_size=block,
                       kv_cache_memory=cache, max_num_batched_tokens=max(2048, context),
                       enable_prefix_caching=False)
    engine = LLMEngine(cfg, model=model)
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for prompt in torch.randint(0, model.cfg.vocab_size, (batch, context), generator=gen).tolist():
        engine.add_request(prompt, params)
    started: set[str] = set()
    while len(started) < batch:  # prefill until each sequence has its first token
        started |= {out.request_id for out in engine.step() if out.outputs[0].token_ids}
    engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps


def measure_decode(m: CatalogModel, batch: int, context: int, steps: int = 16) -> dict:
    cfg = _check_runnable(m)
    hw = measure_local()
    seconds = _time_decode(random_model(cfg), batch, context, steps)
    mid = context + 1 + steps // 2  # mean context over the timed steps
    roof = cost.decode_roofline(m.shape, hw, batch, mid, "bf16", devices=1)
    measured = batch / seconds
    return {"model": m.key, "hardware": hw.name, "bandwidth_gbs": hw.bandwidth_tbs * 1e3,
            "tflops": hw.tflops["bf16"], "batch": batch, "context": context, "steps": steps,
            "threads": torch.get_num_threads(), "tokens_per_s": measured,
            "roofline_tokens_per_s": roof.tokens_per_s, "bound": roof.bound,
            "ratio": measured / roof.tokens_per_s}
