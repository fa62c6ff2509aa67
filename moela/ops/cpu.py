"""CPU backend: oneDNN-prepacked bf16 weights for every projection and routed expert.

    backend = ops.load("cpu")                    # or ops.select("auto", cpu, bfloat16)
    quantize.prepare(model, backend)             # packs the weights once; inference only

`ops.select` calls `setup()` when it chooses this backend: glibc keeps freed memory in its heap.

Prepacked (blocked) weights are read 1.5-2x faster than plain ones by the small-row GEMMs of decode
steps and expert dispatch. A weight that was not packed (MLA's wkv_b, which the absorbed path slices
per head; a tied embedding) takes the plain GEMM. The routed experts run one packed GEMM pair per
expert that has tokens, so each MoE layer reads its per-expert token counts on the host (the one
host synchronisation of this backend's decode step). Other ops are the reference's.
"""

import ctypes

import torch
import torch.nn.functional as F

from moela.ops.reference import expert_loop


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if device.type != "cpu":
        return f"it runs on the CPU, not {device}"
    if dtype != torch.bfloat16:
        return f"it packs bfloat16 weights, not {dtype}"
    return None


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    if weight.is_mkldnn:  # packed already (a model handed to the backend twice)
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [pack_linear(w) for w in w13], [pack_linear(w) for w in w2]


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: list[torch.Tensor],
        w2: list[torch.Tensor], limit: float | None = None) -> torch.Tensor:
    return expert_loop(x, weights, indices, w13, w2, linear, limit)


def setup() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS.

    Each step allocates large temporaries (activations, gathered latents); by default glibc maps
    and unmaps them every time, and the fresh pages fault in again (~20% of prefill time here).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MiB from the heap
    libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
