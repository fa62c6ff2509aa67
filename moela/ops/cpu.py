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
host synchronisation of this backend's decode step). Other ops are the reference's.

Quantized weights keep reference.quantize_weight's codes (so they equal the reference's to the last
bit) in the layouts of torch's weight-only kernels: int8 codes with bf16 row scales for
`_weight_int8pack_mm`, int4 codes in `_convert_weight_to_int4pack_for_cpu`'s blocked layout with a
bf16 scale and zero per group and row for `_weight_int4pack_mm_for_cpu`. Both kernels read bf16 activations
only (their fp32 paths are scalar, 10-100x slower). Which kernel a row count takes was measured
with bench/quant_kernels.py: see `DEQUANT_ROWS`.
"""

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moela.ops.reference import QuantizedWeight, expert_loop, quantize_weight, weight_format

try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    LIBC = None
PACK_VALUES = 1 << 22  # weights quantized and packed at a time: their fp32 temporaries stay ~16 MiB each


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
    packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.int(), 1)
    return Int4Weight(packed, scales_zeros.bfloat16().contiguous(), q.group_size)


def _empty(part: Int8Weight | Int4Weight, out: int) -> Int8Weight | Int4Weight:
    if isinstance(part, Int4Weight):
        groups, _, two = part.scales_zeros.shape
        return Int4Weight(part.packed.new_empty(out, part.packed.shape[1]), part.scales_zeros.new_empty(groups, out, two),
                          part.group_size)
    return Int8Weight(part.codes.new_empty(out, part.codes.shape[1]), part.scales.new_empty(out))


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight | Int4Weight) -> torch.Tensor:
    if isinstance(weight, Int4Weight):  # the int kernels take contiguous rows only (a no-op for most inputs)
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), weight.packed, weight.group_size, weight.scales_zeros)
    if isinstance(weight, Int8Weight):
        if weight.codes.shape[1] % 16:  # torch's int8 kernel reads past rows of other widths (a crash at 4+ rows)
            return F.linear(x, weight.codes.to(x.dtype) * weight.scales[:, None])
        return torch._weight_int8pack_mm(x.contiguous(), weight.codes, weight.scales)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def pack_experts(w13: torch.Tensor | list, w2: torch.Tensor | list, quantization: str | None = None) -> tuple[list, list]:
    return [pack_linear(w, quantization) for w in w13], [pack_linear(w, quantization) for w in w2]


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: list[torch.Tensor],
        w2: list[torch.Tensor]) -> torch.Tensor:
    return expert_loop(x, weights, indices, w13, w2, linear)


def setup() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    Each step allocates large temporaries (activations, gathered latents); by default glibc maps
    and unmaps them every time, and the fresh pages fault in again (~20% of prefill time here).
    """
    if LIBC is not None:
        LIBC.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB from the heap
        LIBC.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
