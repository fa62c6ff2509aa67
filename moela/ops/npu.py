"""Ascend NPU backend: the op surface on torch_npu's fused kernels, device "npu". Untested on hardware:
written against torch_npu's documented signatures, and tests/test_ops.py runs it against the reference
only where torch_npu and an NPU are present (everywhere else it skips, saying why).

    pip install 'moela[npu]'           # torch_npu, matched to torch; Ascend's CANN toolkit installed separately
    LLM(model=path, device="npu", dtype="bfloat16")            # "auto" picks this backend on an NPU

Imported only for device "npu" (ops.load_device) or when asked for by name: importing torch_npu
registers the device with torch, and fails where CANN's libraries are missing. Fused kernels:
RMSNorm (npu_rms_norm), rope (npu_rotary_mul, interleaved pairs de-interleaved first as the reference
does), and the routed experts (npu_moe_init_routing, two npu_grouped_matmul with npu_swiglu between,
npu_moe_finalize_routing). The router (moela/models/layers.py Gate), MLA attention and the rest are
the reference's plain PyTorch, which torch_npu runs op by op.
"""

import torch

from moela.ops.reference import swiglu

try:
    import torch_npu
except Exception as e:  # ImportError, or an OSError/RuntimeError from CANN's libraries
    raise ImportError(f"torch_npu does not load ({type(e).__name__}: {e}); pip install 'moela[npu]' and Ascend's CANN") from e


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "npu":
        return f"it runs on Ascend NPUs (device npu), not {device}"
    if not torch.npu.is_available():
        return "torch_npu finds no NPU (is the CANN driver installed and a device visible?)"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """As the reference: x [T, ..., r], cos/sin [T, r/2]; rotate-half form on [T, 1, heads, r] in fp32."""
    h = x.float().reshape(x.shape[0], 1, -1, x.shape[-1])  # [T, 1, heads, r]
    if interleave:
        h = torch.cat([h[..., 0::2], h[..., 1::2]], dim=-1)  # pairs (2i, 2i+1) -> (i, i + r/2)
    full = lambda t: torch.cat([t, t], dim=-1)[:, None, None, :]  # noqa: E731  [T, 1, 1, r]
    return torch_npu.npu_rotary_mul(h, full(cos), full(sin)).reshape(x.shape).to(x.dtype)


def pack_experts(w13: torch.Tensor, w2: torch.Tensor, quant: None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2I, d], [E, d, I] -> [E, d, 2I], [E, I, d]: the grouped matmul's (in, out) layout, once at start-up.
    No quantized kernels here (so ops.quantizes is False and the engine never asks for them)."""
    if quant is not None:
        raise ValueError(f"the npu backend has no quantized experts ({quant!r})")
    return w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()


def moe(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        limit: float | None = None) -> torch.Tensor:
    """The reference's moe on packed weights: tokens sorted by expert on the device, two grouped matmuls
    with the counts per expert as their group list, and the weighted sum back in token order. V4's
    clamped SwiGLU (limit) is the reference's, npu_swiglu has no clamp."""
    T, k = indices.shape
    experts = indices.to(torch.int32)
    rows = torch.arange(T * k, dtype=torch.int32, device=x.device).view(k, T).t().contiguous()  # [T, k]
    xs, source_rows, sorted_experts = torch_npu.npu_moe_init_routing(x, row_idx=rows, expert_idx=experts, active_num=T)
    counts = torch_npu.npu_moe_compute_expert_tokens(sorted_experts, w13.shape[0]).to(torch.int64)  # cumulative
    grouped = dict(split_item=2, group_list_type=0, group_type=0, group_list=counts)
    gate_up = torch_npu.npu_grouped_matmul(x=[xs], weight=[w13], **grouped)[0]  # [T*k, 2I]
    h = torch_npu.npu_swiglu(gate_up) if limit is None else swiglu(gate_up, limit)  # [T*k, I]
    ys = torch_npu.npu_grouped_matmul(x=[h], weight=[w2], **grouped)[0]  # [T*k, d]
    return torch_npu.npu_moe_finalize_routing(ys, skip1=None, skip2=None, bias=None, scales=weights.to(x.dtype),
                                              expanded_src_to_dst_row=source_rows, export_for_source_row=experts)
