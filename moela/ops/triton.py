"""Triton backend: the op surface as Triton kernels (moela/ops/triton_kernels.py), one source for NVIDIA
and AMD GPUs. "auto" picks it on CUDA devices (ROCm's torch calls its GPUs "cuda" too); `backend="triton"`
forces it, also on an Ascend "npu" with triton-ascend, where it has never been run.

    backend = ops.select("auto", torch.device("cuda"), torch.bfloat16)    # -> this backend
    quantize.prepare(model, backend)      # FP8 checkpoint weights stay FP8 (pack_fp8), the rest as loaded

| op | here |
|---|---|
| rms_norm, add_rms_norm | up to 16 rows per program; the residual add fused into the norm |
| rope | 64 (token, head) rows per program |
| latent_attention | absorbed MLA over the paged latent cache: every absorbed query token (decodes and chunks, any lengths, any block size) in one launch, keys split into slices whose partial softmaxes a second kernel merges |
| sparse_latent_attention | V3.2's absorbed MLA over the indexer's top-k picks: one program per (token, 16 heads), the picked rows gathered through the block table, online softmax |
| causal_attention | flash attention, causal (the naive MLA prefill of a prompt) |
| moe | (token, expert) pairs sorted by expert on the device; one grouped GEMM for gate/up with SiLU*up fused, one for down with the routing weights applied |
| pack_fp8, linear | FP8 e4m3 weights with block scales kept as they are; linear quantizes activations per 1 x block and runs an FP8 GEMM |

Projections with bf16/fp16/fp32 weights stay torch's (cuBLAS, hipBLASLt): Triton would not beat them.
On AMD MI300/MI350 FP8 weights are converted to the activations' dtype inside the GEMM (weight-only FP8:
half the bytes of bf16 read, the same math); before Ada/Hopper (and other AMD GPUs), where Triton has no
e4m3, pack_fp8 dequantizes them to the model's dtype at start-up.
Every index plan is built on the host before the forward (`plan`), and the number of key slices depends
on the step's shape only, so a decode step can be captured in a CUDA graph (moela/engine/graphs.py).

On the CPU the kernels run only under TRITON_INTERPRET=1 (Triton's interpreter; slow), which is how the
tests check every kernel against the reference; `available` refuses the CPU otherwise.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from moela.ops import reference
from moela.ops import triton_kernels as kernels
from moela.ops.triton_kernels import INTERPRET

MAX_SPLITS = 64  # key slices per query token, at most


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"its kernels take bfloat16, float16 or float32, not {dtype}"
    if device.type == "cpu":
        return None if INTERPRET else "it runs on the CPU only under TRITON_INTERPRET=1 (Triton's interpreter, for tests)"
    if device.type not in ("cuda", "npu"):
        return f"it compiles for GPUs and NPUs, not {device}"
    return None


@dataclass(frozen=True)
class Fp8Weight:
    """e4m3 weight [..., out, in] and its fp32 scales [..., ceil(out / block[0]), ceil(in / block[1])]."""

    weight: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]


def pack_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    """Kept as FP8 where Triton reads e4m3 on this device and the GEMMs can step through K within one scale
    block at a time (a power of two >= 16); dequantized otherwise."""
    bi = block[1]
    if not _fp8_weights(weight.device) or bi < 16 or bi & (bi - 1):
        return reference.pack_fp8(weight, scale_inv, block, dtype)
    return Fp8Weight(weight.contiguous(), scale_inv.float().contiguous(), tuple(block))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as [rows, D] with unit stride along D (a view where x allows)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x)
    res = rows if residual is None else _rows(residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = out if residual is None else torch.empty_like(out)
    n, block = rows.shape[0], triton.next_power_of_2(x.shape[-1])
    block_rows = max(1, min(16, 2048 // block))  # several short rows per program
    if n:
        kernels.rms_norm_kernel[(triton.cdiv(n, block_rows),)](
            rows, res, rows if weight is None else weight, out, total, n, rows.stride(0), res.stride(0), x.shape[-1], eps,
            ADD=residual is not None, WEIGHT=weight is not None, BLOCK_ROWS=block_rows, BLOCK=block,
            num_warps=min(max(block * block_rows // 256, 1), 8))
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    T, r = x.shape[0], x.shape[-1]
    heads = x.reshape(T, -1, r)  # [T, H, r]
    if heads.stride(-1) != 1:
        heads = heads.contiguous()
    n = T * heads.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n:
        kernels.rope_kernel[(triton.cdiv(n, 64),)](heads, cos, sin, out, n, heads.shape[1], r // 2, heads.stride(0),
                                                  heads.stride(1), cos.stride(0), INTERLEAVE=interleave, BLOCK_ROWS=64,
                                                  BLOCK_R=triton.next_power_of_2(r // 2))
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [h, S, dk], v [h, S, dv] (any strides with unit stride along the last dim) -> [h, S, dv]."""
    h, S, dk = q.shape
    dv = v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(h, S, dv, dtype=v.dtype, device=v.device)
    block_m, block_dk = 64, max(triton.next_power_of_2(dk), 16)
    kernels.causal_attention_kernel[(triton.cdiv(S, block_m), h)](
        q, k, v, out, S, dk, dv, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_DK=block_dk, BLOCK_DV=max(triton.next_power_of_2(dv), 16),
        num_warps=8 if block_dk >= 128 else 4)
    return out


def plan(ctx) -> None:
    """Build the step's token plan (and the absorbed rows a mixed step gathers, and each token's sequence,
    which the reference ops of later models read) on the device before the forward."""
    naive, absorbed = ctx.split()
    ctx.token_seqs()
    if absorbed:
        ctx.plans[("triton", ctx.block_size)] = _token_plan(ctx, ctx.positions.device)
        if naive:
            ctx.absorbed_rows()


def _token_plan(ctx, device: torch.device) -> torch.Tensor:
    """[T_abs, 4] int32, one row per absorbed query token: (token row, its sequence's block-table row,
    keys it sees = its position + 1, its sequence's first token row)."""
    rows = [(ctx.q_starts[i] + j, i, ctx.kv_lens[i] - ctx.q_lens[i] + j + 1, ctx.q_starts[i])
            for i in ctx.split()[1] for j in range(ctx.q_lens[i])]
    return torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 4)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def latent_attention(q: torch.Tensor, cache: torch.Tensor | None, latent: torch.Tensor, ctx, scale: float,
                     value_dim: int) -> torch.Tensor:
    key = ("triton", None if cache is None else cache.shape[1])
    if key not in ctx.plans:
        ctx.plans[key] = _token_plan(ctx, q.device)
    tokens = ctx.plans[key]
    programs = max(tokens.shape[0] * triton.cdiv(q.shape[1], 16), 1)
    splits = max(1, min(MAX_SPLITS, 2 * _num_sms(q.device) // programs))
    return paged_latent_attention(q, cache, latent, ctx.block_tables, tokens, scale, value_dim, splits)


def paged_latent_attention(q: torch.Tensor, cache: torch.Tensor | None, latent: torch.Tensor, block_tables: torch.Tensor | None,
                           tokens: torch.Tensor, scale: float, value_dim: int, splits: int) -> torch.Tensor:
    """latent_attention for the tokens of a token plan, keys cut into `splits` slices (a power of two: each
    count compiles its own merge kernel) -> [T, h, value_dim]."""
    T, H, W = q.shape
    C, n, splits = value_dim, tokens.shape[0], 1 << (splits.bit_length() - 1)
    out = (torch.empty if n == T else torch.zeros)(T, H, C, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    keys = latent if cache is None else cache.view(-1, W)  # [rows, c + r]
    part_o = torch.empty(n * H * splits if splits > 1 else 0, C, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(part_o.shape[0], dtype=torch.float32, device=q.device)
    block_m, block_c = 16, max(triton.next_power_of_2(C), 16)
    kernels.latent_attention_kernel[(n, triton.cdiv(H, block_m), splits)](
        q, keys, tokens if cache is None else block_tables, tokens, out, part_o, part_lse,
        q.stride(0), q.stride(1), 0 if cache is None else block_tables.stride(0), keys.stride(0), H, C, W - C,
        scale, 1 if cache is None else cache.shape[1], splits, PAGED=cache is not None, BLOCK_M=block_m,
        BLOCK_N=32, BLOCK_C=block_c, BLOCK_R=max(triton.next_power_of_2(W - C), 16), num_warps=8 if block_c >= 256 else 4)
    if splits > 1:
        kernels.merge_splits_kernel[(n * H,)](part_o, part_lse, tokens, out, H, C, SPLITS=splits,
                                              BLOCK_C=triton.next_power_of_2(C))
    return out


def sparse_latent_attention(q: torch.Tensor, cache: torch.Tensor | None, latent: torch.Tensor, indices: torch.Tensor,
                            ctx, scale: float, value_dim: int) -> torch.Tensor:
    """V3.2's absorbed MLA over the indexer's picks indices [T, k]: one launch for every token of the step."""
    T, H, W = q.shape
    out = q.new_empty(T, H, value_dim)
    if T == 0:
        return out
    indices = indices.contiguous()
    if cache is None:  # picks are positions among the sequence's own new tokens, rows of `latent`
        keys, tables, owner, block_size = latent, indices, ctx.token_starts(), 1
    else:
        keys, tables, owner, block_size = cache.view(-1, W), ctx.block_tables, ctx.token_seqs(), cache.shape[1]
    block_m, block_c = 16, max(triton.next_power_of_2(value_dim), 16)
    kernels.sparse_latent_attention_kernel[(T, triton.cdiv(H, block_m))](
        q, keys, tables, owner, indices, out, q.stride(0), q.stride(1), tables.stride(0), keys.stride(0),
        indices.stride(0), H, value_dim, W - value_dim, indices.shape[1], scale, block_size, PAGED=cache is not None,
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_C=block_c, BLOCK_R=max(triton.next_power_of_2(W - value_dim), 16),
        num_warps=8 if block_c >= 256 else 4)
    return out


@functools.cache
def _fp8_weights(device: torch.device) -> bool:
    """Whether Triton converts e4m3 here: NVIDIA sm_89+, AMD MI300/MI350 (gfx94x, gfx95x), the interpreter."""
    if device.type == "cpu":
        return INTERPRET
    if device.type != "cuda":
        return False
    if torch.version.hip is not None:
        return torch.cuda.get_device_properties(device).gcnArchName.startswith(("gfx94", "gfx95"))
    return torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def _fp8_dots(device: torch.device) -> bool:
    """Whether the GPU multiplies e4m3 by e4m3 (NVIDIA sm_89+); the interpreter does, to test that path."""
    if device.type == "cpu":
        return INTERPRET
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> e4m3 [M, K] and one fp32 scale per row and group of K [M, ceil(K / group)]."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, triton.cdiv(K, group), dtype=torch.float32, device=x.device)
    if M:
        kernels.quantize_kernel[(triton.cdiv(M, 16), scale.shape[1])](x, q, scale, M, K, x.stride(0), BLOCK_ROWS=16, GROUP=group)
    return q, scale


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    if isinstance(weight, Fp8Weight):
        return fp8_linear(x, weight, _fp8_dots(x.device))
    return F.linear(x, weight)


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, fp8_dots: bool) -> torch.Tensor:
    """x [..., K] @ W^T for an FP8 W [N, K]: activations quantized per 1 x block[1] when fp8_dots."""
    rows = _rows(x)
    (M, K), N, (bo, bi) = rows.shape, weight.weight.shape[0], weight.block
    a, a_scale = quantize_activations(rows, bi) if fp8_dots else (rows, rows)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, block_n = (16 if M <= 16 else 64), 64
    kernels.fp8_linear_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        a, a_scale, weight.weight, weight.scale_inv, out, M, N, K, a.stride(0), weight.weight.stride(0),
        weight.scale_inv.stride(0), SCALE_N=bo, SCALE_K=bi, FP8_A=fp8_dots, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=min(64, bi), num_warps=4)
    return out.view(*x.shape[:-1], N)


def sort_by_expert(indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, block_expert): the T*k (token, expert) pair ids (t * k + j) grouped by expert, each group padded
    to whole blocks of block_m rows (padding holds T*k), and each block's expert (-1 past the last). All on
    the device, in shapes that depend on T, k and E only: nothing is read back."""
    flat = indices.flatten()
    n = flat.numel()
    order = flat.argsort(stable=True)  # [n] pair ids sorted by expert
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    expert = flat[order]
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[expert]  # place within its expert
    num_blocks = triton.cdiv(n, block_m) + min(num_experts, n)  # sum of ceil(count / block_m) <= this
    pairs = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=flat.device)
    pairs[(ends - padded)[expert] + rank] = order.to(torch.int32)
    block_expert = torch.searchsorted(ends, torch.arange(num_blocks, device=flat.device) * block_m, right=True)
    return pairs, torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)


def _expert_args(w) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], dict]:
    """(weight, scales, the scales' expert and row strides, the kernels' constexprs) for stacked experts
    [E, N, K], plain or FP8: K steps of at most 64 that never straddle a scale block."""
    if isinstance(w, Fp8Weight):
        (bo, bi), s = w.block, w.scale_inv
        return w.weight, s, (s.stride(0), s.stride(1)), dict(FP8_W=True, SCALE_N=bo, SCALE_K=bi, BLOCK_K=min(64, bi))
    block_k = min(64, max(16, triton.next_power_of_2(w.shape[-1])))
    return w, w, (0, 0), dict(FP8_W=False, SCALE_N=1, SCALE_K=block_k, BLOCK_K=block_k)


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13, w2, limit: float | None = None) -> torch.Tensor:
    return fused_moe(x, weights, indices, w13, w2, _fp8_dots(x.device), limit)


def fused_moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13, w2, fp8_dots: bool,
              limit: float | None = None) -> torch.Tensor:
    """moe with FP8 expert weights multiplied in fp8 (activations quantized per 1 x block) when fp8_dots."""
    (T, D), topk = x.shape, indices.shape[1]
    w13_t, s13, strides13, const13 = _expert_args(w13)
    w2_t, s2, strides2, const2 = _expert_args(w2)
    E, I = w13_t.shape[0], w13_t.shape[1] // 2
    n = T * topk
    block_m = 16 if n <= 16 * E else 64  # rows per expert block: decode steps have few per expert
    pairs, block_expert = sort_by_expert(indices, E, block_m)
    quantize_x, quantize_h = const13["FP8_W"] and fp8_dots, const2["FP8_W"] and fp8_dots
    a, a_scale = quantize_activations(x, const13["SCALE_K"]) if quantize_x else (x, x)
    new = torch.zeros if quantize_h else torch.empty  # padding rows are never written: zeros quantize cleanly
    h = new(pairs.numel(), I, dtype=x.dtype, device=x.device)  # [padded rows, I], in expert order
    kernels.moe_gate_up_kernel[(block_expert.numel(), triton.cdiv(I, 64))](
        a, a_scale, w13_t, s13, pairs, block_expert, h, D, I, topk, n, 0.0 if limit is None else limit, a.stride(0),
        w13_t.stride(0), w13_t.stride(1), *strides13, FP8_A=quantize_x, CLAMP=limit is not None, BLOCK_M=block_m,
        BLOCK_N=64, num_warps=4, **const13)
    h_q, h_scale = quantize_activations(h, const2["SCALE_K"]) if quantize_h else (h, h)
    y = torch.empty(n, D, dtype=x.dtype, device=x.device)  # [T*k, D] weighted expert outputs, token-major
    kernels.moe_down_kernel[(block_expert.numel(), triton.cdiv(D, 64))](
        h_q, h_scale, w2_t, s2, pairs, block_expert, weights.float().contiguous(), y, D, I, n, w2_t.stride(0),
        w2_t.stride(1), *strides2, FP8_A=quantize_h, BLOCK_M=block_m, BLOCK_N=64, num_warps=4, **const2)
    return y.view(T, topk, D).sum(dim=1)
