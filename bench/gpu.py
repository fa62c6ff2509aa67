"""One visit to a GPU: what the triton backend reaches there, in one command that stays within 8 minutes.

    PYTHONPATH=. python bench/gpu.py          # on the GPU machine: writes bench/results/gpu-<device>-<date>.json
    PYTHONPATH=. python bench/gpu.py --dry-run    # anywhere, every section at toy sizes (no GPU: Triton's interpreter)

Needs torch, triton and transformers only (nothing of the server's, no network). Sections, in order; each
is skipped once --budget-s seconds have passed, and an error in one is recorded and the next runs:
  device  copy bandwidth (a 2 GiB bf16 copy, read + write) and bf16 matmul rate (8192^3), best of 5
  checks  greedy tokens of tiny random V2-Lite- and V3-shaped models: triton vs reference (fp32, bf16),
          and triton with CUDA graphs vs without
  mla     the absorbed-MLA decode kernel: GB/s of latent cache read (each byte once), batch 1-128 x
          context 1k-32k, 16 heads (V2-Lite) and 128 (V3), against the copy bandwidth
  moe     the fused MoE: TFLOP/s and GB/s of expert weights touched, V2-Lite and V3 expert shapes, bf16 and
          FP8 (V3), 1-4096 tokens, beside the reference's torch grouped matmul
  fp8     the FP8 block-scale GEMM (V3's wo shape) beside torch's bf16 linear
  e2e     decode tok/s of bench-1b and a random DeepSeek-V2-Lite-shaped model (15.7B, bf16), batch 1/32/128,
          128-token prompts, 64 new tokens: moela (triton, CUDA graphs) and transformers generate on the same
          weights; moela's median decode step against the roofline (bytes a step reads / copy bandwidth)
Kernel times are CUDA-graph replays of 10 calls (no launch overhead), median of 3; engine times are wall clock.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

FULL = dict(copy_mib=2048, matmul=8192, mla_heads=(16, 128), mla_batches=(1, 8, 32, 128),
            mla_contexts=(1024, 4096, 16384, 32768), block=64, moe_tokens=(1, 32, 128, 1024, 4096),
            e2e=("bench-1b", "deepseek-v2-lite"), batches=(1, 32, 128), prompt=128, new=64, check_new=8)
DRY = dict(copy_mib=8, matmul=128, mla_heads=(4,), mla_batches=(1, 3), mla_contexts=(20, 70), block=8, moe_tokens=(1, 5),
           e2e=("bench-tiny", "deepseek-v2-lite"), batches=(1, 2), prompt=6, new=3, check_new=3)
MOE_SHAPES = {"v2-lite": dict(E=64, d=2048, inter=1408, k=6), "v3": dict(E=256, d=7168, inter=2048, k=8)}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=512, bos_token_id=0,
            eos_token_id=1)  # toy dims over a catalog shape


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every section at toy sizes, to check the script")
    p.add_argument("--budget-s", type=float, default=360, help="sections start only while this much time has not passed")
    p.add_argument("--only", nargs="+", choices=("checks", "mla", "moe", "fp8", "e2e"),
                   help="run these sections (and device, always)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    return p.parse_args()


ARGS = parse_args()
if ARGS.dry_run and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moela import ops  # noqa: E402
from moela.config import ModelConfig  # noqa: E402
from moela.engine.config import EngineConfig
from moela.cost import formulas as cost  # noqa: E402
from moela.cost.catalog import load_model as catalog_model  # noqa: E402
from moela.cost.measure import random_model  # noqa: E402
from moela.engine.llm import LLMEngine  # noqa: E402
from moela.engine.sampler import SamplingParams  # noqa: E402
from moela.names import map_name  # noqa: E402
from moela.models import StepContext  # noqa: E402
from moela.ops import reference  # noqa: E402
from moela.ops import triton as tt  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
SIZES = DRY if ARGS.dry_run else FULL
START = time.monotonic()


def time_left() -> bool:
    return time.monotonic() - START < ARGS.budget_s


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def kernel_seconds(fn) -> tuple[float, str]:
    """(seconds per call, how): median of 3 replays of a CUDA graph of 10 calls, so no launch overhead; if fn
    cannot be captured, 10 calls between two events; wall clock of one call without a GPU."""
    fn()
    fn()  # compiled and warm
    if not CUDA:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, "wall"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            for _ in range(10):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        run, how = graph.replay, "graph"
    except RuntimeError:
        run, how = (lambda: [fn() for _ in range(10)]), "eager"
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    return sorted(times)[1], how


def device_section() -> dict:
    src = torch.ones(SIZES["copy_mib"] * 2**19, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    n = SIZES["matmul"]
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    return {"copy_gb_s": 2 * src.nbytes / best_seconds(lambda: dst.copy_(src)) / 1e9,
            "bf16_matmul_tflop_s": 2 * n**3 / best_seconds(lambda: a @ b) / 1e12}


def small_config(name: str) -> dict:
    return catalog_model(name).config | TINY


def engine_on(model, backend: str, graphs: bool, max_num_seqs: int, max_model_len: int) -> LLMEngine:
    cfg = EngineConfig(device=str(DEVICE), backend=backend, cuda_graphs=graphs, max_num_seqs=max_num_seqs,
                       max_model_len=max_model_len, max_num_batched_tokens=max(2048, max_num_seqs * SIZES["prompt"]),
                       skip_tokenizer_init=True, enable_prefix_caching=False)
    return LLMEngine(cfg, model=model)


def generate(engine: LLMEngine, prompts: list[list[int]], new: int) -> dict:
    """Greedy `new` tokens for every prompt together: tokens, wall time, median decode-only step, prefill time."""
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    sync()
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    done, steps = {}, []
    while engine.has_unfinished():
        prefill = bool(engine.scheduler.waiting) or any(s.in_prefill for s in engine.scheduler.running)
        t = time.perf_counter()
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        steps.append((prefill, time.perf_counter() - t))
    wall = time.perf_counter() - start
    decode = sorted(t for pre, t in steps if not pre)
    return {"tokens": [done[i] for i in ids], "wall_s": wall, "tokens_per_s": len(prompts) * new / wall,
            "decode_step_ms": 1e3 * decode[len(decode) // 2] if decode else None,
            "prefill_s": sum(t for pre, t in steps if pre)}


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed + batch)).tolist()


def checks_section() -> dict:
    out = {}
    for name in ("deepseek-v2-lite", "bench-1b"):
        for dtype in (torch.float32, torch.bfloat16):
            model = random_model(ModelConfig.from_dict(small_config(name)), device=DEVICE).to(dtype)
            prompts = [[5, 9, 17, 33, 2, 71], [7, 8, 9], [3] * 11]
            runs = {(b, g): generate(engine_on(model, b, g, 4, 64), prompts, SIZES["check_new"])["tokens"]
                    for b, g in (("reference", False), ("triton", False), ("triton", CUDA))}
            same = lambda x, y: sum(a == b for p, q in zip(runs[x], runs[y]) for a, b in zip(p, q))  # noqa: E731
            total = len(prompts) * SIZES["check_new"]
            out[f"{name}-tiny {str(dtype)[6:]}"] = {
                "tokens": total, "triton_equal_reference": same(("triton", False), ("reference", False)),
                "graphs_equal_eager": same(("triton", CUDA), ("triton", False)) if CUDA else "no CUDA: not run"}
    return out


def mla_section(copy_gb_s: float) -> list[dict]:
    bs, c, r = SIZES["block"], 512, 64
    batches, contexts = SIZES["mla_batches"], SIZES["mla_contexts"]
    blocks_per_seq = max(contexts) // bs + 1
    cache = torch.randn(max(batches) * blocks_per_seq, bs, c + r, dtype=torch.bfloat16, device=DEVICE)
    tables = torch.randperm(cache.shape[0], device=DEVICE).view(max(batches), blocks_per_seq)
    rows = []
    for heads in SIZES["mla_heads"]:
        for b in batches:
            for length in contexts:
                if not time_left():
                    return rows + [{"skipped": "time budget"}]
                q = torch.randn(b, heads, c + r, dtype=torch.bfloat16, device=DEVICE)
                ctx = StepContext(positions=torch.full((b,), length - 1, device=DEVICE), q_lens=[1] * b, kv_lens=[length] * b,
                                  block_tables=tables[:b], block_size=bs)
                tt.plan(ctx)
                s, how = kernel_seconds(lambda: tt.latent_attention(q, cache, None, ctx, 0.1, c))
                gb_s = b * length * (c + r) * 2 / s / 1e9
                rows.append({"heads": heads, "batch": b, "context": length, "us": s * 1e6, "gb_s": gb_s,
                             "of_copy_bandwidth": gb_s / copy_gb_s, "timed": how})
    return rows


def expert_weights(shape: dict, fp8: bool) -> tuple:
    """Stacked random experts (w13 [E, 2I, d], w2 [E, d, I]), bf16, or e4m3 with 128 x 128 block scales."""
    E, d, inter = shape["E"], shape["d"], shape["inter"]
    w13, w2 = torch.randn(E, 2 * inter, d, device=DEVICE, dtype=torch.bfloat16), torch.randn(E, d, inter, device=DEVICE, dtype=torch.bfloat16)
    if not fp8:
        return w13.mul_(d**-0.5), w2.mul_(inter**-0.5)
    scales = [torch.full((E, -(-w.shape[1] // 128), -(-w.shape[2] // 128)), 1 / 64 / w.shape[2] ** 0.5, device=DEVICE) for w in (w13, w2)]
    return tuple(tt.pack_fp8(w.mul_(64).to(torch.float8_e4m3fn), s, (128, 128), torch.bfloat16) for w, s in zip((w13, w2), scales))  # 7 sigma = 448


def moe_section() -> list[dict]:
    rows = []
    shapes = MOE_SHAPES if not ARGS.dry_run else {"toy": dict(E=8, d=64, inter=32, k=2)}
    for name, shape in shapes.items():
        E, k, d, inter = shape["E"], shape["k"], shape["d"], shape["inter"]
        for fp8 in (False, True) if name != "v2-lite" else (False,):
            w13, w2 = expert_weights(shape, fp8)
            for tokens in SIZES["moe_tokens"]:
                if not time_left():
                    return rows + [{"skipped": "time budget"}]
                x = torch.randn(tokens, d, dtype=torch.bfloat16, device=DEVICE)
                weights, indices = torch.randn(tokens, E, device=DEVICE).softmax(-1).topk(k, dim=-1)
                s, how = kernel_seconds(lambda: tt.moe(x, weights, indices, w13, w2))
                touched = indices.unique().numel() * 3 * d * inter * (1 if fp8 else 2)
                row = {"shape": name, "dtype": "fp8" if fp8 else "bf16", "tokens": tokens, "us": s * 1e6, "timed": how,
                       "tflop_s": 6 * tokens * k * d * inter / s / 1e12, "weight_gb_s": touched / s / 1e9}
                if not fp8:
                    ref_s, ref_how = kernel_seconds(lambda: reference.moe(x, weights, indices, w13, w2))
                    row |= {"reference_us": ref_s * 1e6, "reference_timed": ref_how}
                rows.append(row)
            del w13, w2
    return rows


def fp8_section() -> list[dict]:
    n, kdim = (7168, 16384) if not ARGS.dry_run else (64, 256)  # V3's wo
    w = torch.randn(n, kdim, device=DEVICE, dtype=torch.bfloat16)
    scale = torch.full((-(-n // 128), -(-kdim // 128)), 1 / 64 / kdim**0.5, device=DEVICE)
    packed = tt.pack_fp8((w * 64).to(torch.float8_e4m3fn), scale, (128, 128), torch.bfloat16)
    w.mul_(kdim**-0.5)
    rows = []
    for m in (1, 32, 128, 4096) if not ARGS.dry_run else (1, 5):
        x = torch.randn(m, kdim, device=DEVICE, dtype=torch.bfloat16)
        (s, how), (s_bf16, _) = kernel_seconds(lambda: tt.linear(x, packed)), kernel_seconds(lambda: F.linear(x, w))
        rows.append({"m": m, "n": n, "k": kdim, "fp8_us": s * 1e6, "bf16_us": s_bf16 * 1e6, "timed": how,
                     "fp8_tflop_s": 2 * m * n * kdim / s / 1e12, "fp8_weight_gb_s": n * kdim / s / 1e9})
    return rows


def hf_copy(model, config: dict):
    """transformers' model for config on the device, bf16, holding exactly moela's weights."""
    import transformers

    prefix = "DeepseekV2" if config["model_type"] == "deepseek_v2" else "DeepseekV3"
    hf_config = getattr(transformers, prefix + "Config")(**{k: v for k, v in config.items() if k != "model_type"})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            hf = getattr(transformers, prefix + "ForCausalLM")(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    ours = model.state_dict()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            our_name, expert, half = map_name(name)  # every HF tensor has a moela source: a None here is a bug
            src = ours[our_name] if expert is None else ours[our_name][expert]
            p.copy_(src if half is None else src.chunk(2)[half])
    return hf


def hf_generate(hf, prompts: list[list[int]], new: int) -> dict:
    ids = torch.tensor(prompts, device=DEVICE)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
        sync()
    wall = time.perf_counter() - start
    return {"tokens": out[:, ids.shape[1]:].tolist(), "wall_s": wall, "tokens_per_s": len(prompts) * new / wall}


def e2e_shape(name: str, copy_gb_s: float) -> dict:
    config = small_config(name) if ARGS.dry_run and name != "bench-tiny" else catalog_model(name).config
    shape = catalog_model(name).shape if not ARGS.dry_run else None
    model = random_model(ModelConfig.from_dict(config), device=DEVICE)
    batches, prompt, new = SIZES["batches"], SIZES["prompt"], SIZES["new"]
    prompts = {b: prompts_for(b, prompt, config["vocab_size"]) for b in batches}
    result = {"moela": {}, "transformers": {}}
    hf = hf_copy(model, config)  # before the engine: its prepare() re-lays the router weights
    engine = engine_on(model, "triton" if ops.why_unavailable("triton", DEVICE, torch.bfloat16) is None else "auto", CUDA,
                       max(batches), prompt + new + 1)
    generate(engine, prompts_for(1, prompt, config["vocab_size"], seed=99), 1)  # warm-up
    for b in batches:
        if not time_left():
            result["moela"][b] = {"skipped": "time budget"}
            continue
        r = generate(engine, prompts[b], new)
        if shape is not None:  # the roofline of a decode step at the mean context
            step_bytes = sum(cost.decode_bytes(shape, b, prompt + new // 2, "bf16"))
            r["roofline_step_ms"] = 1e3 * step_bytes / (copy_gb_s * 1e9)
            r["of_roofline"] = r["roofline_step_ms"] / r["decode_step_ms"]
        result["moela"][b] = r
    result["backend"], result["graphs"] = engine.backend.name, engine.runner.graphs is not None
    del engine
    hf_generate(hf, prompts_for(1, prompt, config["vocab_size"], seed=99), 1)  # warm-up
    for b in batches:
        if not time_left():
            result["transformers"][b] = {"skipped": "time budget"}
            continue
        r = result["transformers"][b] = hf_generate(hf, prompts[b], new)
        ours = result["moela"].get(b, {})
        if "tokens" in ours:
            ours["speedup_vs_transformers"] = ours["tokens_per_s"] / r["tokens_per_s"]
            ours["greedy_tokens_equal_transformers"] = sum(a == c for p, q in zip(ours["tokens"], r["tokens"]) for a, c in zip(p, q))
    for side in ("moela", "transformers"):
        for r in result[side].values():
            r.pop("tokens", None)
    return result


def run_section(result: dict, name: str, section) -> None:
    """result[name] = section(), or why not: the time budget, or the error (one broken section must not
    cost the visit the others)."""
    if not time_left():
        result[name] = {"skipped": "time budget"}
        return
    t = time.monotonic()
    try:
        result[name] = section()
    except Exception as e:
        traceback.print_exc()
        result[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"[{time.monotonic() - START:4.0f} s] {name} ({time.monotonic() - t:.0f} s): {json.dumps(result[name])[:1500]}", flush=True)
    if CUDA:
        torch.cuda.empty_cache()


def main() -> int:
    result = {"device": torch.cuda.get_device_name(DEVICE) if CUDA else f"CPU ({platform.processor() or platform.machine()})",
              "dry_run": ARGS.dry_run, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
              "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__,
                           "transformers": __import__("transformers").__version__, "python": platform.python_version()}}
    run_section(result, "device", device_section)  # always: the other sections measure against its bandwidth
    copy_gb_s = result["device"]["copy_gb_s"]
    sections = {"checks": checks_section, "mla": lambda: mla_section(copy_gb_s), "moe": moe_section, "fp8": fp8_section}
    sections |= {f"e2e {n}": (lambda n=n: e2e_shape(n, copy_gb_s)) for n in SIZES["e2e"]}
    for name, section in sections.items():
        if not ARGS.only or name.split()[0] in ARGS.only:
            run_section(result, name, section)
    result["wall_s"] = time.monotonic() - START
    slug = "dry-run" if ARGS.dry_run else result["device"].lower().replace(" ", "-")
    out = Path(ARGS.out) / f"gpu-{slug}-{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} after {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
