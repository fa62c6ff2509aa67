"""Transforms of a built model that hand it to a backend: every weight in the layout the backend's
kernels read, and every layer calling that backend's ops.

    backend = ops.select("auto", torch.device("cpu"), torch.bfloat16)
    model = load_model(path, torch.bfloat16)
    prepare(model, backend)          # once, after loading; inference only unless the backend is the reference

Projections go through the backend's pack_linear, routed experts through pack_experts (the reference
keeps both as they are); FP8 weights that the loader kept (keep_fp8) through its pack_fp8 first, which
keeps them FP8 where its kernels read FP8 and dequantizes them otherwise. A Linear the model also slices
itself (`sliced`: MLA's wkv_b per head, V4's grouped wo_a) stays plain, in the model's dtype. The router
weight is upcast to fp32 once (the router computes in fp32 anyway, so this is exact).
"""

import torch

from moela.models.layers import Experts, Gate, HashGate, Linear, OpsModule
from moela.ops import REFERENCE, Backend


@torch.no_grad()
def prepare(model: torch.nn.Module, backend: Backend) -> None:
    fp8 = (model.cfg.quantization.weight_block_size if model.cfg.quantization else (128, 128), model.embed.weight.dtype)
    for module in model.modules():
        if isinstance(module, Linear) and module.sliced:
            _replace(module, "weight", _unpacked(module, "weight", REFERENCE, *fp8))
        elif isinstance(module, Linear):
            _replace(module, "weight", backend.pack_linear(_unpacked(module, "weight", backend, *fp8)))
        elif isinstance(module, (Gate, HashGate)):
            module.weight.data = module.weight.data.float()
        elif isinstance(module, Experts):
            w13, w2 = (_unpacked(module, name, backend, *fp8) for name in ("w13", "w2"))
            for name, packed in zip(("w13", "w2"), backend.pack_experts(w13, w2)):
                _replace(module, name, packed)
        if isinstance(module, OpsModule):
            module.ops = backend
    if backend.name != "reference":
        model.requires_grad_(False)


def _unpacked(module: torch.nn.Module, name: str, backend: Backend, block: tuple[int, int], dtype: torch.dtype):
    """The weight as pack_linear / pack_experts take it: an e4m3 one that the loader kept (keep_fp8) goes
    through the backend's pack_fp8 with its scales, which the module then drops."""
    weight = getattr(module, name)
    if weight.dtype != torch.float8_e4m3fn:
        return weight
    scale_inv = getattr(module, name + "_scale_inv")
    delattr(module, name + "_scale_inv")
    return backend.pack_fp8(weight, scale_inv, block, dtype)


def _replace(module: torch.nn.Module, name: str, packed) -> None:
    """Put a packed weight in place of the parameter (as a plain attribute); an unchanged one stays."""
    if packed is not getattr(module, name):
        delattr(module, name)
        setattr(module, name, packed)
