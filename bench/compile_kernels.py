"""Compile every kernel of the triton backend ahead of time for real GPUs, on a machine without one.

    PYTHONPATH=. python bench/compile_kernels.py                      # NVIDIA sm_80, sm_89, sm_90; AMD gfx942
    PYTHONPATH=. python bench/compile_kernels.py --targets cuda:90 --model v3

Triton compiles to PTX/cubin (and AMDGCN) without a device. Each kernel is compiled with the block sizes
its wrapper in moela/ops/triton.py picks for a model's dims (DeepSeek-V3 or V2-Lite, bf16), so a kernel
that would not compile, or would spill registers, shows up before a GPU visit. Reports per kernel and
target: the shared memory it needs and, for NVIDIA, ptxas' registers per thread and spilled bytes.
Writes bench/results/compile-kernels-<date>.json. It says nothing about speed or correctness on a GPU.
"""

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from moela.ops import triton_kernels as k

DIMS = {"v3": dict(H=128, C=512, R=64, DK=192, DV=128, D=7168, I=2048),
        "v2-lite": dict(H=16, C=512, R=64, DK=192, DV=128, D=2048, I=1408)}


def p2(n: int) -> int:
    return triton.next_power_of_2(n)


def kernels(m: dict) -> dict[str, tuple]:
    """name -> (kernel, {argument: type or constexpr value}, num_warps), as the wrappers launch them."""
    bf, i32, f32 = "*bf16", "i32", "fp32"
    rows = lambda d: max(1, min(16, 2048 // p2(d)))  # noqa: E731
    moe = dict(FP8_A=False, SCALE_N=1, SCALE_K=64, BLOCK_M=16, BLOCK_N=64)
    moe8 = dict(FP8_A=True, SCALE_N=128, SCALE_K=128, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    return {
        "rms_norm (hidden, residual add)": (k.rms_norm_kernel, dict(
            x=bf, res=bf, weight=bf, out=bf, total=bf, n_rows=i32, stride_x=i32, stride_r=i32, D=i32, eps=f32,
            ADD=True, WEIGHT=True, BLOCK_ROWS=rows(m["D"]), BLOCK=p2(m["D"])), min(max(p2(m["D"]) * rows(m["D"]) // 256, 1), 8)),
        "rms_norm (kv_lora_rank)": (k.rms_norm_kernel, dict(
            x=bf, res=bf, weight=bf, out=bf, total=bf, n_rows=i32, stride_x=i32, stride_r=i32, D=i32, eps=f32,
            ADD=False, WEIGHT=True, BLOCK_ROWS=rows(m["C"]), BLOCK=p2(m["C"])), min(max(p2(m["C"]) * rows(m["C"]) // 256, 1), 8)),
        "rope": (k.rope_kernel, dict(x=bf, cos="*fp32", sin="*fp32", out=bf, n_rows=i32, H=i32, HALF=i32, stride_t=i32,
                                     stride_h=i32, stride_c=i32, INTERLEAVE=True, BLOCK_ROWS=64, BLOCK_R=p2(m["R"] // 2)), 4),
        "latent_attention": (k.latent_attention_kernel, dict(
            q=bf, keys=bf, tables="*i64", tokens="*i32", out=bf, part_o="*fp32", part_lse="*fp32", stride_qt=i32,
            stride_qh=i32, stride_tb=i32, stride_k=i32, H=i32, C=i32, R=i32, scale=f32, block_size=i32, splits=i32,
            PAGED=True, BLOCK_M=16, BLOCK_N=32, BLOCK_C=p2(m["C"]), BLOCK_R=p2(m["R"])), 8 if p2(m["C"]) >= 256 else 4),
        "sparse_latent_attention": (k.sparse_latent_attention_kernel, dict(
            q=bf, keys=bf, tables="*i64", owner="*i64", indices="*i64", out=bf, stride_qt=i32, stride_qh=i32, stride_tb=i32,
            stride_k=i32, stride_i=i32, H=i32, C=i32, R=i32, K=i32, scale=f32, block_size=i32, PAGED=True, BLOCK_M=16,
            BLOCK_N=32, BLOCK_C=p2(m["C"]), BLOCK_R=p2(m["R"])), 8 if p2(m["C"]) >= 256 else 4),
        "merge_splits (8 slices)": (k.merge_splits_kernel, dict(part_o="*fp32", part_lse="*fp32", tokens="*i32", out=bf,
                                                                H=i32, C=i32, SPLITS=8, BLOCK_C=p2(m["C"])), 4),
        "causal_attention": (k.causal_attention_kernel, dict(
            q=bf, k=bf, v=bf, out=bf, S=i32, DK=i32, DV=i32, scale=f32, sq_h=i32, sq_s=i32, sk_h=i32, sk_s=i32, sv_h=i32,
            sv_s=i32, BLOCK_M=64, BLOCK_N=32, BLOCK_DK=p2(m["DK"]), BLOCK_DV=p2(m["DV"])), 8 if p2(m["DK"]) >= 128 else 4),
        "quantize (1 x 128)": (k.quantize_kernel, dict(x=bf, q="*fp8e4nv", scale="*fp32", M=i32, K=i32, stride_x=i32,
                                                        BLOCK_ROWS=16, GROUP=128), 4),
        "fp8_linear": (k.fp8_linear_kernel, dict(
            a="*fp8e4nv", a_scale="*fp32", w="*fp8e4nv", w_scale="*fp32", out=bf, M=i32, N=i32, K=i32, stride_a=i32,
            stride_w=i32, stride_ws=i32, SCALE_N=128, SCALE_K=128, FP8_A=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), 4),
        "fp8_linear (FP8 weights, bf16 dots)": (k.fp8_linear_kernel, dict(
            a=bf, a_scale=bf, w="*fp8e4nv", w_scale="*fp32", out=bf, M=i32, N=i32, K=i32, stride_a=i32,
            stride_w=i32, stride_ws=i32, SCALE_N=128, SCALE_K=128, FP8_A=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), 4),
        "moe_gate_up": (k.moe_gate_up_kernel, dict(
            x=bf, x_scale=bf, w=bf, w_scale=bf, pairs="*i32", block_expert="*i32", h=bf, D=i32, I=i32, TOPK=i32,
            num_pairs=i32, limit=f32, stride_x=i32, stride_we=i32, stride_wn=i32, stride_se=i32, stride_sn=i32, FP8_W=False,
            CLAMP=False, BLOCK_K=64, **moe), 4),
        "moe_down": (k.moe_down_kernel, dict(
            h=bf, h_scale=bf, w=bf, w_scale=bf, pairs="*i32", block_expert="*i32", weights="*fp32", y=bf, D=i32, I=i32,
            num_pairs=i32, stride_we=i32, stride_wn=i32, stride_se=i32, stride_sn=i32, FP8_W=False, BLOCK_K=64, **moe), 4),
        "moe_gate_up (FP8)": (k.moe_gate_up_kernel, dict(
            x="*fp8e4nv", x_scale="*fp32", w="*fp8e4nv", w_scale="*fp32", pairs="*i32", block_expert="*i32", h=bf, D=i32,
            I=i32, TOPK=i32, num_pairs=i32, limit=f32, stride_x=i32, stride_we=i32, stride_wn=i32, stride_se=i32, stride_sn=i32,
            FP8_W=True, CLAMP=False, **moe8), 4),
        "moe_down (FP8)": (k.moe_down_kernel, dict(
            h="*fp8e4nv", h_scale="*fp32", w="*fp8e4nv", w_scale="*fp32", pairs="*i32", block_expert="*i32",
            weights="*fp32", y=bf, D=i32, I=i32, num_pairs=i32, stride_we=i32, stride_wn=i32, stride_se=i32,
            stride_sn=i32, FP8_W=True, **moe8), 4),
    }


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes, from the ptxas bundled with Triton."""
    ptxas = get_ptxas(arch).path  # the one Triton itself runs for this arch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": int(regs[1]) if regs else None, "spill_bytes": max(spills, default=0)}


RUNTIME_SIZES = {"n_rows", "M", "num_pairs", "S", "splits", "TOPK"}  # ints that need not be multiples of 16


def compile_one(fn, args: dict, num_warps: int, target: GPUTarget) -> dict:
    """As Triton compiles at a launch: pointers and the dims and strides of real models (multiples of 16)
    marked 16-divisible, which lets loads vectorize."""
    constexprs = {name: v for name, v in args.items() if not isinstance(v, str)}
    signature = {name: ("constexpr" if name in constexprs else v) for name, v in args.items()}
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, v) in enumerate(args.items())
               if isinstance(v, str) and (v.startswith("*") or v == "i32" and name not in RUNTIME_SIZES)}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned), target=target,
                              options={"num_warps": num_warps})
    out = {"seconds": round(time.perf_counter() - start, 1), "shared_bytes": compiled.metadata.shared}
    if target.backend == "cuda":
        out |= ptxas_stats(compiled.asm["ptx"], target.arch)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["cuda:80", "cuda:89", "cuda:90", "hip:gfx942"],
                   help="backend:arch (cuda:90 = H100/H200, cuda:80 = A100, cuda:89 = Ada, hip:gfx942 = MI300)")
    p.add_argument("--model", choices=DIMS, default="v3", help="dims the block sizes are picked for")
    p.add_argument("--out", default="bench/results", help="folder for the JSON result")
    args = p.parse_args()
    results, failed = {}, 0
    for spec in args.targets:
        backend, arch = spec.split(":")
        target = GPUTarget(backend, int(arch) if backend == "cuda" else arch, 32 if backend == "cuda" else 64)
        fp8 = arch.startswith(("gfx94", "gfx95")) if backend == "hip" else int(arch) >= 89  # as moela/ops/triton.py: _fp8_weights
        for name, (fn, kernel_args, warps) in kernels(DIMS[args.model]).items():
            if not fp8 and ("fp8" in name.lower() or "quantize" in name):
                results.setdefault(spec, {})[name] = "not used here: pack_fp8 dequantizes FP8 weights on this target"
                continue
            try:
                r = compile_one(fn, kernel_args, warps, target)
            except Exception as e:  # report every kernel and target, then fail
                r, failed = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}, failed + 1
            results.setdefault(spec, {})[name] = r
            print(f"{spec:11} {name:38} {json.dumps(r)}", flush=True)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out = Path(args.out) / f"compile-kernels-{args.model}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python bench/compile_kernels.py " + " ".join(sys.argv[1:]), "date": date,
                               "triton": triton.__version__, "model": args.model, "results": results}, indent=1))
    print(f"wrote {out}; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
