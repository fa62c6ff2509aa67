"""Calibrate the cost model: time moela's own decode on this machine and set it beside the roofline.

    from moela.cost.catalog import load_model
    from moela.cost.measure import measure_decode
    measure_decode(load_model("bench-1b"), batch=1, context=128)
    # {"tokens_per_s": 21.3, "roofline_tokens_per_s": 45.0, "ratio": 0.47, ...}

Builds the model with random bf16 weights (uniform-looking routing, which is what the roofline's
expected-experts formula assumes), gives moela's engine `batch` random prompts of `context` tokens,
then times `steps` engine steps in which every sequence decodes one token (scheduling, the absorbed
MLA path over the paged latent cache, sampling).
"""

import time

import torch

from moela import ops
from moela.config import MODEL_TYPES, ModelConfig
from moela.engine.config import EngineConfig
from moela.cost import formulas as cost
from moela.cost.catalog import CatalogModel
from moela.cost.formulas import Hardware
from moela.engine.llm import LLMEngine
from moela.engine.sampler import SamplingParams
from moela.models import Transformer, build_model

MAX_MEMORY_SHARE = 0.5  # refuse shapes whose bf16 weights need more than this share of RAM


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: page faults, thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(mib: int = 128, repeats: int = 3) -> float:
    """Bytes per second (read + write) of a torch copy of a `mib` MiB bf16 tensor, best of `repeats`."""
    src = torch.ones(mib * 2**19, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), repeats)


def measure_local() -> Hardware:
    """This machine, measured now with torch on the CPU: copy bandwidth and bf16 matmul rate."""
    bandwidth = copy_bandwidth()
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    flops = 2 * 2048**3 / _best_seconds(lambda: a @ b)
    threads = torch.get_num_threads()
    sources = {
        "memory_gb": "this machine: physical memory",
        "bandwidth_tbs": f"measured now: best of 3 torch copies of a 128 MiB bf16 tensor (read + write), "
                         f"{threads} threads",
        "bf16": f"measured now: best of 3 torch bf16 2048x2048 matmuls, {threads} threads",
    }
    return Hardware(f"this machine (CPU, {threads} torch thread{'s' * (threads > 1)})",
                    ops.device_memory(torch.device("cpu")) / 1e9, bandwidth / 1e12, {"bf16": flops / 1e12}, sources)


def random_model(cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu") -> Transformer:
    """A bf16 model for timing: matrices N(0, 1/fan_in) (the embedding N(0, 1)), norms 1 + 0.1 N(0, 1),
    zero router biases and random hash routes, so activations keep their scale and routing spreads out."""
    model = build_model(cfg, torch.bfloat16, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device)
            if p.dim() == 1:  # norm weights
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (1.0 if name == "embed.weight" else p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.zero_()
            elif name.endswith("tid2eid"):  # V4's hash routing: a random expert per (token, pick)
                b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape, generator=gen, device=device))
    return model.eval()


def _check_runnable(m: CatalogModel) -> ModelConfig:
    if m.config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"--measure runs moela's model, which supports {', '.join(MODEL_TYPES)}; "
                         f"{m.key} is {m.config.get('model_type')} (try bench-1b)")
    ram = ops.device_memory(torch.device("cpu"))
    need = cost.weight_bytes(m.shape, "bf16")
    if need > MAX_MEMORY_SHARE * ram:
        raise ValueError(f"--measure builds {m.key} in bf16 here: {need / 1e9:.1f} GB of weights, more than "
                         f"{MAX_MEMORY_SHARE:.0%} of this machine's {ram / 1e9:.1f} GB (try bench-1b)")
    return ModelConfig.from_dict(m.config)


def _time_decode(model: Transformer, batch: int, context: int, steps: int, backend: str) -> float:
    """Seconds per engine step once every sequence decodes (prefill and one warm-up step untimed)."""
    cfg = EngineConfig(max_model_len=context + steps + 2, max_num_seqs=batch, skip_tokenizer_init=True,
                       max_num_batched_tokens=max(2048, context), enable_prefix_caching=False, backend=backend)
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


def measure_decode(m: CatalogModel, batch: int, context: int, steps: int = 16, backend: str = "auto",
                   hw: Hardware | None = None) -> dict:
    """moela's decode tokens/s at `context` (the mean over the timed steps) beside the roofline on `hw`
    (this machine, measured now unless given)."""
    cfg = _check_runnable(m)
    hw = hw or measure_local()
    prompt_len = max(1, context - 1 - steps // 2)
    seconds = _time_decode(random_model(cfg), batch, prompt_len, steps, backend)
    mid = prompt_len + 1 + steps // 2  # mean context over the timed steps: `context` unless that is tiny
    roof = cost.decode_roofline(m.shape, hw, batch, mid, "bf16", devices=1)
    measured = batch / seconds
    return {"model": m.key, "hardware": hw.name, "bandwidth_gbs": hw.bandwidth_tbs * 1e3,
            "tflops": hw.tflops["bf16"], "batch": batch, "context": mid, "steps": steps,
            "threads": torch.get_num_threads(), "tokens_per_s": measured,
            "roofline_tokens_per_s": roof.tokens_per_s, "bound": roof.bound,
            "ratio": measured / roof.tokens_per_s}
