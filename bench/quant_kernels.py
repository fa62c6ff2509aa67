"""Time the CPU kernels a linear layer can take, per weight shape and row count M: the measurements
behind moela/ops/cpu.py's choice (DEQUANT_ROWS) between torch's int kernels and a dequantized GEMM.

    python bench/quant_kernels.py                          # bench-1b's and DeepSeek-V2-Lite's shapes
    python bench/quant_kernels.py --shapes 2816x2048 --rows 1 8 64 --threads 1

For each [out, in] weight and M: oneDNN-prepacked bf16 (the cpu backend's unquantized path), fp32
F.linear, torch's int8 and int4 weight-only kernels with bf16 activations (and, at M <= 4, with fp32
activations, which take a scalar path), and each quantized weight dequantized to bf16 then one plain
GEMM (what cpu.linear does from DEQUANT_ROWS rows on). Best of --repeats calls after a warm-up (the
least disturbed by other processes); GB/s is the weight bytes the kernel reads over its time.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

from moela.ops import cpu

import record  # bench/record.py

SHAPES = {  # [out, in]: bench-1b's matrices, then DeepSeek-V2-Lite's
    "bench-1b wq_b": (3072, 384), "bench-1b wo": (1024, 2048), "bench-1b expert w13": (1024, 1024),
    "bench-1b expert w2": (1024, 512), "bench-1b head": (32000, 1024),
    "v2-lite wq": (3072, 2048), "v2-lite expert w13": (2816, 2048), "v2-lite expert w2": (2048, 1408),
}


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def kernels(weight: torch.Tensor) -> dict:
    """name -> (bytes read per call, fn(x_bf16) -> y, largest M to time it at)."""
    out, inp = weight.shape
    packed_bf16, w32 = cpu.pack_linear(weight), weight.float()
    found = {"bf16 onednn": (2 * out * inp, lambda x: cpu.linear(x, packed_bf16), None),
             "fp32 F.linear": (4 * out * inp, lambda x: F.linear(x.float(), w32), None)}
    q8 = cpu.pack_linear(weight, "int8")
    s32 = q8.scales.float()
    found["int8"] = (out * inp, lambda x: torch._weight_int8pack_mm(x, q8.codes, q8.scales), None)
    found["int8 fp32-act"] = (out * inp, lambda x: torch._weight_int8pack_mm(x.float(), q8.codes, s32), 4)
    found["int8 dequant+gemm"] = (out * inp, lambda x: F.linear(x, q8.codes.to(x.dtype).mul_(q8.scales[:, None])), None)
    for group in (32, 128):
        q4 = cpu.pack_linear(weight, f"int4-g{group}")
        if not isinstance(q4, cpu.Int4Weight) or q4.group_size != group:
            continue
        nbytes = out * inp // 2 + 4 * out * inp // group
        found[f"int4-g{group}"] = (nbytes, lambda x, q=q4: torch._weight_int4pack_mm_for_cpu(
            x, q.packed, q.group_size, q.scales_zeros), None)
        if group == 128:
            sz32 = q4.scales_zeros.float()
            found["int4-g128 fp32-act"] = (nbytes, lambda x, q=q4: torch._weight_int4pack_mm_for_cpu(
                x.float(), q.packed, q.group_size, sz32), 4)
            if cpu._unpacks(q4):
                found["int4-g128 dequant+gemm"] = (nbytes, lambda x, q=q4: x @ cpu._dequantize_int4(q, x.dtype), None)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", help="OUTxIN weights (default: bench-1b's and V2-Lite's)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    load = os.getloadavg()
    torch.set_num_threads(args.threads)
    cpu.setup()  # the heap settings the engine runs with: dequantized weights reuse freed memory
    shapes = {s: tuple(map(int, s.split("x"))) for s in args.shapes} if args.shapes else SHAPES
    results = {}
    for label, (out, inp) in shapes.items():
        weight = (torch.randn(out, inp) * inp ** -0.5).bfloat16()
        found = kernels(weight)
        print(f"{label} [{out}x{inp}]: ms per call (GB/s of weights)")
        print(f"{'M':>5} " + " ".join(f"{k:>24}" for k in found))
        results[label] = {"shape": [out, inp], "ms": {}}
        for m in args.rows:
            x = torch.randn(m, inp).bfloat16()
            row = {k: best_ms(lambda f=fn: f(x), args.repeats) for k, (_, fn, most) in found.items() if most is None or m <= most}
            results[label]["ms"][m] = row
            print(f"{m:>5} " + " ".join(f"{row[k]:>15.3f} ({found[k][0] / row[k] / 1e6:>5.1f})" if k in row else f"{'':>24}"
                                        for k in found))
    record.write(args.out, "quant_kernels", load, {"threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
