"""Time the CPU kernels a linear layer can take, per weight shape and row count M: the measurements
behind moela/ops/cpu.py's choice of kernel for quantized weights.

    python bench/quant_kernels.py                          # bench-1b's and DeepSeek-V2-Lite's shapes
    python bench/quant_kernels.py --shapes 2048x1408 --rows 1 8 64 --threads 2

For each [out, in] weight and M: oneDNN-prepacked bf16 (the cpu backend's unquantized path), fp32
F.linear, torch's int8 weight-only kernel and its int4 kernel (groups 32/64/128), each with bf16 and
with fp32 activations, and "dequant": an int4 weight dequantized into bf16 on every call, then the
bf16 GEMM (what a large M could take instead). Median of --repeats calls after a warm-up; GB/s is
the weight bytes the kernel reads over its time.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from moela.ops import cpu, reference

SHAPES = {  # [out, in]: bench-1b's matrices, then DeepSeek-V2-Lite's
    "bench-1b wq_b": (3072, 384), "bench-1b wo": (1024, 2048), "bench-1b expert w13": (1024, 1024),
    "bench-1b expert w2": (1024, 512), "bench-1b head": (32000, 1024),
    "v2-lite wq": (3072, 2048), "v2-lite expert w13": (2816, 2048), "v2-lite expert w2": (2048, 1408),
}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def kernels(weight: torch.Tensor) -> dict:
    """name -> (bytes read per call, fn(x_bf16) -> y)."""
    out, inp = weight.shape
    packed_bf16, w32 = cpu.pack_linear(weight), weight.float()
    found = {"bf16 onednn": (2 * out * inp, lambda x: cpu.linear(x, packed_bf16)),
             "fp32 F.linear": (4 * out * inp, lambda x: torch.nn.functional.linear(x.float(), w32))}
    q8 = reference.quantize_weight(weight, "int8")
    s8 = {dt: q8.scales.to(dt) for dt in (torch.bfloat16, torch.float32)}
    for act in (torch.bfloat16, torch.float32):
        name = "bf16" if act == torch.bfloat16 else "fp32"
        found[f"int8 {name}-act"] = (out * inp, lambda x, a=act: torch._weight_int8pack_mm(x.to(a), q8.codes, s8[a]))
    for group in (32, 64, 128):
        if inp % group or out % 16:
            continue
        q4 = reference.quantize_weight(weight, f"int4-g{group}")
        packed = torch._convert_weight_to_int4pack_for_cpu(q4.codes.int(), 1)
        sz = torch.stack([q4.scales, q4.mins + 8 * q4.scales], -1).transpose(0, 1).contiguous()  # [groups, out, 2]
        szs = {dt: sz.to(dt) for dt in (torch.bfloat16, torch.float32)}
        nbytes = out * inp // 2 + 4 * out * inp // group
        for act in (torch.bfloat16, torch.float32):
            name = "bf16" if act == torch.bfloat16 else "fp32"
            found[f"int4-g{group} {name}-act"] = (
                nbytes, lambda x, a=act, p=packed, s=szs, g=group: torch._weight_int4pack_mm_for_cpu(x.to(a), p, g, s[a]))
        if group == 128:
            found["int4-g128 dequant+bf16"] = (nbytes, lambda x, q=q4: torch.nn.functional.linear(x, q.dequantize(torch.bfloat16)))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", help="OUTxIN weights (default: bench-1b's and V2-Lite's)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {s: tuple(map(int, s.split("x"))) for s in args.shapes} if args.shapes else SHAPES
    results = {}
    for label, (out, inp) in shapes.items():
        weight = (torch.randn(out, inp) * inp ** -0.5).bfloat16()
        found = kernels(weight)
        print(f"{label} [{out}x{inp}]: ms per call (GB/s)")
        print(f"{'M':>5} " + " ".join(f"{k:>22}" for k in found))
        results[label] = {"shape": [out, inp], "ms": {}}
        for m in args.rows:
            x = torch.randn(m, inp).bfloat16()
            row = {k: median_ms(lambda f=fn: f(x), max(3, args.repeats // max(1, m // 32))) for k, (_, fn) in found.items()}
            results[label]["ms"][m] = row
            print(f"{m:>5} " + " ".join(f"{row[k]:>13.3f} ({found[k][0] / row[k] / 1e6:>5.1f})" for k in found))
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out) / f"quant_kernels-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/quant_kernels.py " + " ".join(os.sys.argv[1:]), "date": date,
                               "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor()}",
                               "threads": args.threads, "load_average": os.getloadavg(), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
