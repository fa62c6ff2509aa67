"""CPU backend: oneDNN-prepacked bf16 weights for every projection and routed expert.

    from moela.backends import cpu
    if cpu.supported(model):
        cpu.prepack(model)       # once, after loading; inference only
        cpu.tune_allocator()     # once per process

Prepacked (blocked) weights are read 1.5-2x faster than plain ones by the small-row GEMMs of decode
steps and expert dispatch (bench/results/ has the numbers). ops.linear recognises a packed weight
and calls the packed kernel; the math is unchanged, so tests compare this backend with the plain
PyTorch reference. wkv_b stays plain: MLA slices it per head for the absorbed path.
"""

import ctypes

import torch

from moela.model import MLA, Experts, Gate, Linear, Transformer


def supported(model: Transformer) -> bool:
    w = model.embed.weight
    return torch.backends.mkldnn.is_available() and w.device.type == "cpu" and w.dtype == torch.bfloat16


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def prepack(model: Transformer) -> None:
    keep = {id(m.wkv_b) for m in model.modules() if isinstance(m, MLA)}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear) and id(module) not in keep:
                packed = pack(module.weight)
                del module.weight
                module.weight = packed
            elif isinstance(module, Gate):  # the router computes in fp32: upcast its weight once (exact)
                module.weight.data = module.weight.data.float()
            elif isinstance(module, Experts):
                for name in ("w13", "w2"):
                    packed = [pack(w) for w in getattr(module, name)]
                    delattr(module, name)
                    setattr(module, name, packed)
    model.requires_grad_(False)


def tune_allocator() -> None:
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
