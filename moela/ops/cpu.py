"""CPU backend: oneDNN-prepacked bf16 weights for every projection and routed expert, or weight-only
int8 / int4 through torch's packed CPU kernels.

    backend = ops.load("cpu")                    # or ops.select("auto", cpu, bfloat16)
    quantize.prepare(model, backend)             # packs the weights once; inference only
    quantize.prepare(model, backend, "int4-g128")  # or quantized (moela/quantize.py also does it on load)

`ops.select` calls `setup()` when it chooses this backend: glibc keeps freed memory in its heap.

Prepacked (blocked) weights are read 1.5-2x faster than plain ones by the small-row GEMMs of decode
steps and expert dispatch. A weight that was not packed (MLA's wkv_b, which the absorbed path slices
per head; a tied embedding) takes the plain GEMM. The routed experts run one packed GEMM pair per
expert that has tokens, so each MoE layer reads its per-expert token counts on the host (the one
host synchronisation of this backend's decode step). rms_norm, add_rms_norm and rope take fewer ops
than the reference's (small decode steps are bound by the number of ops). Other ops are the reference's.

Quantized weights keep reference.quantize_weight's codes (so they equal the reference's to the last
bit) in the layouts of torch's weight-only kernels: int8 codes with bf16 row scales for
`_weight_int8pack_mm`, int4 codes in `_convert_weight_to_int4pack_for_cpu`'s blocked layout with a
bf16 scale and zero per group and row for `_weight_int4pack_mm_for_cpu`. Both kernels read bf16 activations
only (their fp32 paths are scalar, 10-100x slower). They are fast for few rows (decode); for many
rows (prefill, large batches) a weight is dequantized to bf16 for one plain GEMM instead: see
`DEQUANT_ROWS`, measured with bench/quant_kernels.py.
"""

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moela.ops.reference import QuantizedWeight, expert_loop, quantize_weight, swiglu, weight_format

try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    LIBC = None
PACK_VALUES = 1 << 22  # weights quantized and packed at a time: their fp32 temporaries stay ~16 MiB each
# From this many rows on, a quantized weight is dequantized to bf16 for one plain GEMM: the int kernels'
# time grows with every row (on 1 thread here, ~0.3 ms per row for a 2816x2048 weight, int8 or int4),
# dequantizing costs about 15 (int8) and 50 (int4) rows' worth once (bench/quant_kernels.py).
DEQUANT_ROWS = {"int8": 32, "int4": 64}
_INT4_LAYOUT_OK: bool | None = None  # set by _unpacks


@dataclass
class Int8Weight:
    codes: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] bf16: w = code * scale

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


@dataclass
class Int4Weight:
    packed: torch.Tensor  # [out, in / 2] uint8 in the int4 kernel's blocked layout
    scales_zeros: torch.Tensor  # [in / group, out, 2] bf16: w = (code - 8) * scale + zero
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], 2 * self.packed.shape[1]))


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if device.type != "cpu":
        return f"it runs on the CPU, not {device}"
    if dtype != torch.bfloat16:
        return f"it packs bfloat16 weights, not {dtype}"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("this CPU has no bf16 instructions for oneDNN (AVX512-BF16, AMX or AVX-NE-CONVERT): "
                "run in float32 (dtype 'auto' does)")
    return None


def pack_linear(weight: torch.Tensor, quantization: str | None = None) -> torch.Tensor | Int8Weight | Int4Weight:
    """oneDNN's bf16 layout, or the codes of a reference.QUANT_FORMATS format in its kernel's layout,
    quantized a block of rows at a time into preallocated storage (the temporaries stay small)."""
    if isinstance(weight, (Int8Weight, Int4Weight)) or (isinstance(weight, torch.Tensor) and weight.is_mkldnn):
        return weight  # packed already (a model handed to the backend twice)
    if quantization is None:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    (out, inp), fmt, whole = weight.shape, weight_format(weight.shape, quantization), None
    step = max(64, PACK_VALUES // inp // 64 * 64)  # rows at a time, whole blocks of the int4 layout
    for a in range(0, out, step):
        part = _pack_codes(quantize_weight(weight[a : a + step], fmt))
        _release_free_memory()
        if out <= step:
            return part
        if whole is None:
            whole = _empty(part, out)
        rows = slice(a, a + step)
        if isinstance(part, Int4Weight):
            whole.packed[rows], whole.scales_zeros[:, rows] = part.packed, part.scales_zeros
        else:
            whole.codes[rows], whole.scales[rows] = part.codes, part.scales
    return whole


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS. setup() makes glibc keep freed memory; while a model is
    quantized weight by weight (on load), each weight's temporaries would stay behind between the
    packed weights, and resident memory would grow to twice the quantized model."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


def _pack_codes(q: QuantizedWeight) -> Int8Weight | Int4Weight:
    """Codes in their kernel's layout. int4: zero = min + 8 * scale, since the kernel subtracts 8."""
    if q.group_size is None:
        return Int8Weight(q.codes, q.scales.bfloat16())
    scales_zeros = torch.stack([q.scales, q.mins + 8 * q.scales], dim=-1).transpose(0, 1)  # [groups, out, 2]
    packed = torch._convert_weight_to_int4pack_for_cpu(q.int4_codes().int(), 1)
    return Int4Weight(packed, scales_zeros.bfloat16().contiguous(), q.group_size)


def _empty(part: Int8Weight | Int4Weight, out: int) -> Int8Weight | Int4Weight:
    if isinstance(part, Int4Weight):
        groups, _, two = part.scales_zeros.shape
        return Int4Weight(part.packed.new_empty(out, part.packed.shape[1]), part.scales_zeros.new_empty(groups, out, two),
                          part.group_size)
    return Int8Weight(part.codes.new_empty(out, part.codes.shape[1]), part.scales.new_empty(out))


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight | Int4Weight) -> torch.Tensor:
    if isinstance(weight, Int4Weight):
        if x.shape[0] >= DEQUANT_ROWS["int4"] and _unpacks(weight):
            return x @ _dequantize_int4(weight, x.dtype)
        # the int kernels take contiguous rows only (a no-op for most inputs)
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), weight.packed, weight.group_size, weight.scales_zeros)
    if isinstance(weight, Int8Weight):
        # torch's int8 kernel reads past rows whose width is not a multiple of 16 (a crash at 4+ rows)
        if x.shape[0] >= DEQUANT_ROWS["int8"] or weight.codes.shape[1] % 16:
            return F.linear(x, weight.codes.to(x.dtype).mul_(weight.scales[:, None]))
        return torch._weight_int8pack_mm(x.contiguous(), weight.codes, weight.scales)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def _dequantize_int4(weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W^T [in, out] from the int4 kernel's layout, which stores each block of 64 rows input-major as
    [in, 32] bytes: low nibbles rows 0-31, high nibbles rows 32-63 (`_unpacks` checks it against torch)."""
    out, half = weight.packed.shape
    blocks = weight.packed.view(out // 64, 2 * half, 32)  # [out / 64, in, 32]
    wt = torch.empty(2 * half, out // 64, 2, 32, dtype=dtype)  # [in, out / 64, 2, 32] = [in, out]
    wt[:, :, 0].copy_((blocks & 15).transpose(0, 1))
    wt[:, :, 1].copy_((blocks >> 4).transpose(0, 1))
    sz = weight.scales_zeros.float()  # [groups, out, 2]: w = (code - 8) * scale + zero = code * scale + min
    scale, low = sz[..., 0].to(dtype), (sz[..., 1] - 8 * sz[..., 0]).to(dtype)  # contiguous: the in-place ops vectorize
    return wt.view(-1, weight.group_size, out).mul_(scale[:, None]).add_(low[:, None]).view(2 * half, out)


def _unpacks(weight: Int4Weight) -> bool:
    """Whether _dequantize_int4 reads this weight right: whole 64-row blocks, and torch's layout checked
    once (with a probe weight) to be the one it expects."""
    global _INT4_LAYOUT_OK
    if _INT4_LAYOUT_OK is None:
        codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        ones = torch.tensor([1.0, 8.0]).expand(2, 128, 2).to(torch.bfloat16)  # scale 1, zero 8: w = code
        probe = Int4Weight(torch._convert_weight_to_int4pack_for_cpu(codes, 1), ones.contiguous(), 32)
        _INT4_LAYOUT_OK = torch.equal(_dequantize_int4(probe, torch.float32).t(), codes.float())
    return _INT4_LAYOUT_OK and weight.packed.shape[0] % 64 == 0


def pack_experts(w13: torch.Tensor | list, w2: torch.Tensor | list, quantization: str | None = None) -> tuple[list, list]:
    return [pack_linear(w, quantization) for w in w13], [pack_linear(w, quantization) for w in w2]


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: list, w2: list,
        limit: float | None = None) -> torch.Tensor:
    """The reference's expert loop; one token (a single sequence decoding) runs its k experts in turn
    and sums them with one [1, k] @ [k, d] matmul, without sorting pairs by expert."""
    if x.shape[0] != 1:
        return expert_loop(x, weights, indices, w13, w2, linear, limit)
    outs = [linear(swiglu(linear(x, w13[e]), limit), w2[e]) for e in indices[0].tolist()]
    return weights.to(x.dtype) @ torch.cat(outs)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """One op (the reference's takes two): the weight is applied before the cast to x's dtype."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm(total, weight, eps), total


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """The reference's rotation as one complex multiply, in fewer ops (a decode step is bound by their
    count), each pair's members where the reference puts them."""
    r = x.shape[-1]
    h = x.float().unflatten(-1, (r // 2, 2) if interleave else (2, r // 2))
    pairs = torch.view_as_complex(h if interleave else h.transpose(-1, -2).contiguous())  # [T, ..., r/2]
    freqs = torch.complex(cos, sin).view(cos.shape[0], *(1,) * (x.dim() - 2), r // 2)
    out = torch.view_as_real(pairs * freqs)  # [T, ..., r/2, 2]
    return (out if interleave else out.transpose(-1, -2)).flatten(-2).to(x.dtype)


def setup() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    Each step allocates large temporaries (activations, gathered latents); by default glibc maps
    and unmaps them every time, and the fresh pages fault in again (~20% of prefill time here).
    """
    if LIBC is not None:
        LIBC.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB from the heap
        LIBC.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
