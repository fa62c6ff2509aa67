"""Transforms of a built model that hand it to a backend: every weight in the layout the backend's
kernels read, and every layer calling that backend's ops.

    backend = ops.select("auto", torch.device("cpu"), torch.bfloat16)
    model = load_model(path, torch.bfloat16)
    prepare(model, backend)          # once, after loading; inference only unless the backend is the reference

Projections go through the backend's pack_linear, routed experts through pack_experts (the reference
keeps both as they are). A Linear the model also slices itself (`sliced`: MLA's wkv_b per head, V4's
grouped wo_a) stays plain. The router weight is upcast to fp32 once (the router computes in fp32
anyway, so this is exact).
"""

import torch

from moela.models.layers import Experts, Gate, HashGate, Linear, OpsModule
from moela.ops import Backend


@torch.no_grad()
def prepare(model: torch.nn.Module, backend: Backend) -> None:
    for module in model.modules():
        if isinstance(module, Linear) and not module.sliced:
            _replace(module, "weight", backend.pack_linear(module.weight))
        elif isinstance(module, (Gate, HashGate)):
            module.weight.data = module.weight.data.float()
        elif isinstance(module, Experts):
            for name, packed in zip(("w13", "w2"), backend.pack_experts(module.w13, module.w2)):
                _replace(module, name, packed)
        if isinstance(module, OpsModule):
            module.ops = backend
    if backend.name != "reference":
        model.requires_grad_(False)


def _replace(module: torch.nn.Module, name: str, packed) -> None:
    """Put a packed weight in place of the parameter (as a plain attribute); an unchanged one stays."""
    if packed is not getattr(module, name):
        delattr(module, name)
        setattr(module, name, packed)
