"""Transforms of a built model that hand it to a backend: every weight in the layout the backend's
kernels read (quantized, if asked), and every layer calling that backend's ops.

    backend = ops.select("auto", torch.device("cpu"), torch.bfloat16)
    model = load_model(path, torch.bfloat16)
    prepare(model, backend)                        # once, after loading; inference only unless the backend is the reference
    prepare(model, backend, "int4-g128")           # the same, with weight-only int4 (groups of 128)
    model = load_model(path, hook=OnLoad(backend, "int8"))   # quantized tensor by tensor as it loads
    prepare(model, backend, "int8")                # binds the ops; the packed weights stay as they are

Projections go through the backend's pack_linear, routed experts through pack_experts (the reference
keeps both as they are unless asked to quantize). MLA's wkv_b stays plain: the absorbed path slices
it per head. The router weight is upcast to fp32 once (the router computes in fp32 anyway, so this
is exact). Quantization (moela.ops.reference.QUANT_FORMATS) covers every projection, the output head,
and every routed and shared expert; the embedding (one row read per token), norms, router and wkv_b
stay in the model dtype.
"""

import dataclasses

import torch
from torch import nn

from moela.config import ModelConfig
from moela.models import Transformer, build_model
from moela.models.deepseek import MLA
from moela.models.layers import Experts, Gate, Linear, OpsModule
from moela.ops import Backend


@torch.no_grad()
def prepare(model: torch.nn.Module, backend: Backend, quantization: str | None = None) -> None:
    plain = _plain_linears(model)
    for module in model.modules():
        if isinstance(module, Linear) and module not in plain:
            _replace(module, "weight", backend.pack_linear(module.weight, quantization))
        elif isinstance(module, Gate):
            module.weight.data = module.weight.data.float()
        elif isinstance(module, Experts):
            for name, packed in zip(("w13", "w2"), backend.pack_experts(module.w13, module.w2, quantization)):
                _replace(module, name, packed)
        if isinstance(module, OpsModule):
            module.ops = backend
    if backend.name != "reference" or quantization:
        model.requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as they are stored: parameters, and the packed weights that replaced
    parameters (a tensor, a quantized weight's tensors, one per expert)."""
    total = sum(_nbytes(p) for p in model.parameters())
    for m in model.modules():
        packed = [m.weight] if isinstance(m, Linear) else [m.w13, m.w2] if isinstance(m, Experts) else []
        total += sum(_nbytes(w) for w in packed if not isinstance(w, nn.Parameter))
    return total


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list):
        return sum(_nbytes(o) for o in obj)
    if obj is None:  # a slot not loaded yet
        return 0
    return sum(_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor))


def _plain_linears(model: torch.nn.Module) -> list[Linear]:
    """MLA's wkv_b keeps its plain weight."""
    return [m.wkv_b for m in model.modules() if isinstance(m, MLA)]


def _replace(module: torch.nn.Module, name: str, packed) -> None:
    """Put a packed weight in place of the parameter (as a plain attribute); an unchanged one stays."""
    if packed is not getattr(module, name):
        delattr(module, name)
        setattr(module, name, packed)


class OnLoad:
    """Quantization on load, the hook moela.loader.load_model calls: every weight prepare() would quantize
    is packed as it is read, one checkpoint tensor at a time, and never exists in the model dtype (an
    FP8 checkpoint goes from FP8 through fp32 to codes, tensor by tensor). Peak memory: the quantized
    model plus one checkpoint tensor and its temporaries (and a gate half waiting for its up half).

        model = load_model(path, cfg=cfg, hook=OnLoad(backend, "int8"))
        prepare(model, backend, "int8")            # binds the ops; packed weights stay as they are

    Other weights load as load_model loads them; the model is on the CPU.
    """

    def __init__(self, backend: Backend, quantization: str):
        self.backend, self.quantization = backend, quantization
        self.slots: dict[str, tuple[nn.Module, str]] = {}  # parameter name -> (module, attribute) to fill
        self.halves: dict[tuple, dict[int, torch.Tensor]] = {}

    def build(self, cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
        """The model on the meta device, its quantized weights replaced by empty slots (None, or a list of
        None per expert), everything else given empty CPU storage for the loader to fill."""
        model = build_model(cfg, dtype, "meta")
        plain = _plain_linears(model)
        for prefix, module in model.named_modules():
            attrs = ("weight",) if isinstance(module, Linear) and module not in plain else ()
            attrs = ("w13", "w2") if isinstance(module, Experts) else attrs
            for attr in attrs:
                self.slots[f"{prefix}.{attr}"] = (module, attr)
                _replace(module, attr, [None] * len(getattr(module, attr)) if isinstance(module, Experts) else None)
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None:
                        empty = torch.empty_like(t, device="cpu")
                        store[name] = nn.Parameter(empty, requires_grad=False) if store is module._parameters else empty
        model.init_buffers()
        return model

    def take(self, target: tuple[str, int | None, int | None], tensor: torch.Tensor) -> bool:
        name, expert, half = target
        if name not in self.slots:
            return False
        if half is not None:  # gate or up rows of one fused matrix: pack once both are here
            pair = self.halves.setdefault((name, expert), {})
            pair[half] = tensor
            if len(pair) < 2:
                return True
            del self.halves[(name, expert)]
            tensor = torch.cat([pair[0], pair[1]])
        module, attr = self.slots[name]
        pack = lambda w: self.backend.pack_linear(w, self.quantization)  # noqa: E731
        if expert is not None:
            getattr(module, attr)[expert] = pack(tensor)
        elif isinstance(module, Experts):  # a fused [E, ...] checkpoint tensor
            setattr(module, attr, [pack(w) for w in tensor])
        else:
            setattr(module, attr, pack(tensor))
        return True
