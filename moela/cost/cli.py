"""`moela cost`: will a DeepSeek model fit on my hardware, how many users, how fast, at what cost.

    moela cost deepseek-v3                                  # every catalog chip, bf16, batch 32, context 4096
    moela cost r1 --hardware h800 --dtype fp8 --batch 64 --context 8192 --price 2
    moela cost v4-pro --json                                # the same numbers as JSON for scripts
    moela cost v2-lite --hardware h100 --plot v2lite.png    # throughput vs batch, memory vs context
    moela cost path/to/config.json                          # any DeepSeek-V2/V3/V3.2/V4 or Kimi K2 config
    moela cost bench-1b --measure                           # moela's decode tokens/s here vs the roofline
    moela cost v3 --hardware h800 --devices 64 --link-gbs 50 --imbalance 1.2   # tensor vs expert parallelism
    OMP_NUM_THREADS=1 moela cost bench-1b --measure         # on a CPU busy with other work
    python -m moela.cost.cli deepseek-v3                    # the same without the `moela` entry point

Formulas live in moela.cost.formulas, configs and chip figures in moela.cost.catalog. Prices are per device-hour
(default $2, the H800 rental price DeepSeek assumes). An unknown model or chip prints the known ones
and exits 2.
"""

import argparse
import json
import sys
from dataclasses import dataclass

from moela import threads
from moela.config import HelpFormatter
from moela.cost import formulas as cost
from moela.cost.catalog import LOCAL_NAMES, CatalogModel, UnknownEntry, hardware_names, load_hardware, load_model
from moela.ops import BACKENDS

DTYPES = ("bf16", "fp8", "int8", "int4")  # the formats it plans with (moela.config.DTYPE_TABLE), one table column each


@dataclass(frozen=True)
class Settings:
    batch: int
    context: int
    dtype: str  # weights
    kv_dtype: str  # cache
    price: float  # $ per device-hour
    devices: int | None = None  # devices to plan for (default: the fewest that hold weights, or weights + batch)
    link_gbs: float | None = None  # device-to-device bandwidth for the parallelism comparison (default: the chip's)
    imbalance: float = 1.0  # max/mean routed load per device under expert parallelism (moela plan-experts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moela cost", description="Will a DeepSeek model fit on my hardware, how many "
                                "users can I serve, how fast, at what cost? (roofline estimates)",
                                formatter_class=HelpFormatter)
    p.add_argument("model", help="catalog name (deepseek-v3, r1, v4-pro, kimi-k2, bench-1b, ...) or a config.json")
    p.add_argument("--hardware", help=f"one chip (default: every catalog chip; 'local' measures this machine): "
                                      f"{', '.join(hardware_names())}")
    p.add_argument("--batch", type=int, help="sequences decoded together (default 32; 1 with --measure)")
    p.add_argument("--context", type=int, help="tokens of context per sequence (default 4096; 128 with --measure)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--kv-dtype", choices=DTYPES, help="cache dtype (default: the weight dtype)")
    p.add_argument("--price", type=float, default=2.0, help="$ per device-hour (default 2.0)")
    p.add_argument("--devices", type=int, help="devices to plan for (default: the fewest that hold the model)")
    p.add_argument("--link-gbs", type=float, help="device-to-device GB/s, one direction, for tensor vs expert "
                   "parallelism (default: the chip's NVLink figure; 50 is InfiniBand across machines)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="max/mean routed load per device under expert parallelism (moela plan-experts reports it)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="write throughput-vs-batch and memory-vs-context plots")
    p.add_argument("--measure", action="store_true", help="time moela's decode here on random weights")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="with --measure: moela's kernels (default: auto)")
    p.add_argument("--threads", type=threads.argument, default="auto",
                   help="with --measure or local: CPU threads, a number or auto (the cores free when it starts)")
    return p


def model_report(m: CatalogModel, st: Settings) -> dict:
    s, p = m.shape, cost.param_counts(m.shape)
    cache = {d: {"cached": cost.cache_bytes_per_token(s, d), "mha": cost.mha_bytes_per_token(s, d),
                 "gqa8": cost.mha_bytes_per_token(s, d, kv_heads=8), "indexer": cost.indexer_bytes_per_token(s, d),
                 "fixed_per_sequence": cost.cache_values_fixed(s) * cost.DTYPE_BYTES[d]} for d in DTYPES}
    return {
        "key": m.key, "name": m.name, "source": m.source, "attention": s.attention,
        "params": {"total": p.total, "active": p.active, "active_excl_embedding": p.active_excl_embedding,
                   "published_total": m.published_total, "published_active": m.published_active,
                   "published_source": m.published_source},
        "weight_bytes": {d: cost.weight_bytes(s, d) for d in DTYPES},
        "cache_bytes_per_token": cache,
        "cache_bytes_per_sequence": cost.cache_bytes_per_sequence(s, st.context, st.kv_dtype),
        "flops_per_token": {"prefill": cost.prefill_flops_per_token(s, st.context),
                            "decode": cost.decode_flops_per_token(s, st.context)},
        "experts_touched_per_layer": cost.expected_experts(s.n_routed_experts, s.top_k, st.batch),
        "n_routed_experts": s.n_routed_experts,
    }


def hardware_row(m: CatalogModel, key: str, hw: cost.Hardware, st: Settings) -> dict:
    s = m.shape
    for_weights = cost.devices_needed(cost.weight_bytes(s, st.dtype), hw)
    devices = st.devices or for_weights
    roof = cost.decode_roofline(s, hw, st.batch, st.context, st.dtype, st.kv_dtype, st.devices)
    seqs = cost.max_sequences(s, hw, st.dtype, st.kv_dtype, roof.devices, st.context)
    return {
        "hardware": key, "name": hw.name, "memory_gb": hw.memory_gb, "bandwidth_tbs": hw.bandwidth_tbs,
        "tflops": hw.tflops, "sources": hw.sources, "devices_for_weights": for_weights, "devices": devices,
        "free_bytes": cost.free_bytes(s, hw, st.dtype, devices),
        "max_cached_tokens": cost.max_cached_tokens(s, hw, st.dtype, st.kv_dtype, devices),
        "max_sequences": cost.max_sequences(s, hw, st.dtype, st.kv_dtype, devices, st.context),
        "decode": {"devices": roof.devices, "fits": seqs >= st.batch, "tokens_per_s": roof.tokens_per_s,
                   "tokens_per_s_per_device": roof.tokens_per_s_per_device, "bound": roof.bound,
                   "step_seconds": roof.seconds, "weight_bytes": roof.weight_bytes, "kv_bytes": roof.kv_bytes},
        "prefill_tokens_per_s_per_device": cost.prefill_tokens_per_s(s, hw, st.context, st.dtype, st.kv_dtype),
        "usd_per_million_output_tokens": cost.usd_per_million_tokens(roof.tokens_per_s, roof.devices, st.price),
        "parallel": parallel_row(s, hw, st, roof.devices),
    }


def parallel_row(s: cost.CostShape, hw: cost.Hardware, st: Settings, devices: int) -> dict | None:
    """Tensor vs expert parallelism on `devices` devices over the link (None on one device or with no link figure)."""
    link = st.link_gbs or hw.link_gbs
    if devices < 2 or link is None:
        return None
    steps = cost.parallel_decode(s, hw, st.batch, st.context, st.dtype, devices, link, st.imbalance)
    return {"devices": devices, "link_gbs": link, "imbalance": st.imbalance,
            "allreduce_bytes_per_token_layer": cost.allreduce_bytes_per_token(s, devices, st.dtype),
            "alltoall_bytes_per_token_layer": cost.alltoall_bytes_per_token(s, devices, st.dtype),
            **{mode: {"memory_s": step.memory_s, "comm_s": step.comm_s, "step_seconds": step.seconds,
                      "tokens_per_s": st.batch / step.seconds} for mode, step in steps.items()},
            "expert_parallel_pays": steps["expert"].seconds < steps["tensor"].seconds}


def _num(x: float, unit: str = "") -> str:
    """Counts as '671.03B'; with a unit (bytes 'B', 'FLOP') as '1.34 TB' (powers of 1000)."""
    prefixes, i = ["", "K", "M", "G" if unit else "B", "T", "P"], 0
    while abs(x) >= 1000 and i < len(prefixes) - 1:
        x, i = x / 1000, i + 1
    return f"{x:.2f} {prefixes[i]}{unit}" if unit else f"{x:.2f}{prefixes[i]}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [[r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])] for r in [header, *rows]]
    return "\n".join("  ".join(cells) for cells in lines)


def _render_model(r: dict, st: Settings) -> str:
    p = r["params"]
    out = [f"{r['name']} [{r['key']}]  config: {r['source']}",
           f"params   total {_num(p['total'])}, active per token {_num(p['active'])} "
           f"({_num(p['active_excl_embedding'])} without the embedding)"]
    if p["published_total"]:
        active = f" / {_num(p['published_active'])}" if p["published_active"] else ""
        out.append(f"         published {_num(p['published_total'])}{active} ({p['published_source']})")
    out.append("weights  " + ", ".join(f"{d} {_num(b, 'B')}" for d, b in r["weight_bytes"].items()))
    c = r["cache_bytes_per_token"]
    rows = [["cached (as moela/HF store it)", "cached"]]
    rows += [["  of which indexer keys", "indexer"]] if c["bf16"]["indexer"] else []
    rows += [["fixed per sequence (window, buffers)", "fixed_per_sequence"]] if c["bf16"]["fixed_per_sequence"] else []
    rows += [["MHA, same heads", "mha"], ["GQA-8, same head dim", "gqa8"]]
    out += ["", _table(["cache bytes per token", *DTYPES], [[label] + [f"{c[d][k]:,.0f}" for d in DTYPES]
                                                             for label, k in rows])]
    f, ctx = r["flops_per_token"], f"{st.context:,}"
    out += ["", f"FLOPs per token at context {ctx}: prefill {_num(f['prefill'], 'FLOP')}, "
                f"decode {_num(f['decode'], 'FLOP')}",
            f"one sequence's cache at context {ctx} ({st.kv_dtype}): {_num(r['cache_bytes_per_sequence'], 'B')}",
            f"batch {st.batch} touches {r['experts_touched_per_layer']:.1f} of {r['n_routed_experts']} "
            f"routed experts per MoE layer (expected, uniform routing)"]
    return "\n".join(out)


def _render_chips(rows: list[dict], st: Settings) -> str:
    header = ["chip", "devices", "free mem", "cache tokens", f"seqs@{st.context}", "decode devs", "decode tok/s",
              "tok/s/dev", "bound", "prefill tok/s/dev", "$/1M out"]
    body = [[r["name"], str(r["devices"]), _num(r["free_bytes"], "B"), f"{r['max_cached_tokens']:,}",
             f"{r['max_sequences']:,}", str(d["devices"]), f"{d['tokens_per_s']:,.0f}",
             f"{d['tokens_per_s_per_device']:,.0f}", d["bound"] if d["fits"] else "no fit",
             f"{r['prefill_tokens_per_s_per_device']:,.0f}", f"{r['usd_per_million_output_tokens']:.3f}"]
            for r, d in ((r, r["decode"]) for r in rows)]
    title = (f"{st.dtype} weights, {st.kv_dtype} cache, batch {st.batch}, context {st.context:,}, "
             f"${st.price:.2f} per device-hour; roofline (peak bandwidth and FLOPs, no communication), "
             f"{cost.MEMORY_UTIL:.0%} of memory usable")
    return title + "\n" + _table(header, body)


def _render_parallel(rows: list[dict], st: Settings) -> str:
    header = ["chip", "devices", "link GB/s", "all-reduce B/tok/layer", "all-to-all B/tok/layer", "tensor step ms",
              "expert step ms", "expert parallel"]
    body = [[r["name"], str(p["devices"]), f"{p['link_gbs']:g}", f"{p['allreduce_bytes_per_token_layer']:,.0f}",
             f"{p['alltoall_bytes_per_token_layer']:,.0f}",
             *(f"{p[m]['step_seconds'] * 1e3:.2f} ({p[m]['comm_s'] * 1e3:.2f} link)" for m in ("tensor", "expert")),
             "pays" if p["expert_parallel_pays"] else "does not pay"] for r in rows if (p := r["parallel"])]
    title = (f"tensor vs expert parallelism, decode batch {st.batch} (memory time + link time; expert parallel: "
             f"own sequences per device, max/mean routed load {st.imbalance:g}; docs/distributed.md)")
    return title + "\n" + _table(header, body) if body else ""


def render(report: dict, st: Settings) -> str:
    parts = [_render_model(report["model"], st), _render_chips(report["hardware"], st),
             _render_parallel(report["hardware"], st)]
    parts = [p for p in parts if p]
    if "measure" in report:
        parts.append(_render_measure(report["measure"]))
    return "\n\n".join(parts)


def _render_measure(r: dict) -> str:
    return (f"measured on {r['hardware']}: copy {r['bandwidth_gbs']:.1f} GB/s, bf16 matmul {r['tflops']:.2f} TFLOP/s\n"
            f"{r['model']}, bf16, batch {r['batch']}, context {r['context']}: decode {r['tokens_per_s']:.1f} tok/s "
            f"measured vs {r['roofline_tokens_per_s']:.1f} tok/s roofline ({r['bound']}-bound): "
            f"ratio {r['ratio']:.2f}")


def write_plot(m: CatalogModel, chips: dict[str, cost.Hardware], st: Settings, file: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    batches = [2**i for i in range(11)]
    for hw in chips.values():
        speed = [cost.decode_roofline(m.shape, hw, b, st.context, st.dtype, st.kv_dtype).tokens_per_s_per_device
                 for b in batches]
        left.plot(batches, speed, marker="o", label=hw.name)
    left.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="decode tokens/s per device",
             title=f"{m.name}: roofline decode at context {st.context:,}, {st.dtype}")
    left.legend(fontsize=7)
    contexts = [2**i for i in range(10, 21)]
    cached = {"mla": "MLA latent", "dsa": "MLA latent + indexer keys", "v4": "V4 compressed + window"}
    right.plot(contexts, [cost.cache_bytes_per_sequence(m.shape, c, st.kv_dtype) / 1e9 for c in contexts],
               marker="o", label=cached[m.shape.attention])
    for label, heads in (("GQA-8", 8), ("MHA", None)):
        per_token = cost.mha_bytes_per_token(m.shape, st.kv_dtype, heads)
        right.plot(contexts, [per_token * c / 1e9 for c in contexts], marker="o", label=label)
    right.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache per sequence (GB)",
              title=f"cache in {st.kv_dtype}")
    right.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    st = Settings(args.batch or (1 if args.measure else 32), args.context or (128 if args.measure else 4096),
                  args.dtype, args.kv_dtype or args.dtype, args.price, args.devices, args.link_gbs, args.imbalance)
    if (st.batch < 1 or st.context < 1 or st.price < 0 or (st.devices is not None and st.devices < 1)
            or (st.link_gbs is not None and st.link_gbs <= 0) or st.imbalance < 1):
        print("error: --batch, --context, --devices and --link-gbs must be positive, --price not negative, "
              "--imbalance at least 1", file=sys.stderr)
        return 2
    threads.apply(threads.free_now() if args.threads == "auto" else args.threads)
    try:
        m = load_model(args.model)
        keys = [args.hardware] if args.hardware else hardware_names()[:-1]  # "local" only when asked
        chips = {key: load_hardware(key) for key in keys}
    except UnknownEntry as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    report = {"settings": vars(st), "model": model_report(m, st),
              "hardware": [hardware_row(m, k, hw, st) for k, hw in chips.items()]}
    if args.measure:
        from moela.cost.measure import measure_decode

        try:
            here = next((hw for key, hw in chips.items() if key.lower() in LOCAL_NAMES), None)  # measured once
            report["measure"] = measure_decode(m, st.batch, st.context, backend=args.backend, hw=here)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(json.dumps(report, indent=2) if args.json else render(report, st))
    if args.plot:
        try:
            write_plot(m, chips, st, args.plot)
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
