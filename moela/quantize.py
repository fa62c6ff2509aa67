"""Transforms of a built model that hand it to a backend: every weight in the layout the backend's
kernels read (quantized, if asked), and every layer calling that backend's ops.

    backend = ops.select("auto", torch.device("cpu"), torch.bfloat16)
    model = load_model(path, torch.bfloat16)
    prepare(model, backend)                        # once, after loading; inference only unless the backend is the reference
    prepare(model, backend, "int4-g128")           # the same, with weight-only int4 (groups of 128)
    model = load_model(path, hook=OnLoad(backend, "int8"))   # quantized tensor by tensor as it loads
    prepare(model, backend, "int8")                # binds the ops; the packed weights stay as they are

Projections go through the backend's pack_linear, routed experts through pack_experts (the reference
keeps both as they are unless asked to quantize); FP8 weights that the loader kept (keep_fp8) through
its pack_fp8 first, which keeps them FP8 where its kernels read FP8 and dequantizes them otherwise. A
Linear the model also slices itself (`sliced`: MLA's wkv_b per head, V4's grouped wo_a) stays plain,
in the model's dtype. The router weight is upcast to fp32 once (the router computes in fp32 anyway,
so this is exact). Quantization (moela.ops.reference.QUANT_FORMATS) covers every other projection, the
output head, and every routed and shared expert; the embedding (one row read per token), norms and
router stay in the model dtype.
"""

import dataclasses

import torch
from torch import nn

from moela.models.layers import Experts, Gate, HashGate, Linear, OpsModule
from moela.ops import REFERENCE, Backend


@torch.no_grad()
def prepare(model: torch.nn.Module, backend: Backend, quantization: str | None = None) -> None:
    fp8 = (model.cfg.quantization.weight_block_size if model.cfg.quantization else (128, 128), model.embed.weight.dtype)
    for module in model.modules():
        if isinstance(module, Linear) and module.sliced:
            _replace(module, "weight", _unpacked(module, "weight", REFERENCE, *fp8))
        elif isinstance(module, Linear):
            _replace(module, "weight", backend.pack_linear(_unpacked(module, "weight", backend, *fp8), quantization))
        elif isinstance(module, (Gate, HashGate)):
            module.weight.data = module.weight.data.float()
        elif isinstance(module, Experts):
            w13, w2 = (_unpacked(module, name, backend, *fp8) for name in ("w13", "w2"))
            for name, packed in zip(("w13", "w2"), backend.pack_experts(w13, w2, quantization)):
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


def _unpacked(module: torch.nn.Module, name: str, backend: Backend, block: tuple[int, int], dtype: torch.dtype):
    """The weight as pack_linear / pack_experts take it: an e4m3 one that the loader kept (keep_fp8) goes
    through the backend's pack_fp8 with its scales, which the module then drops."""
    weight = getattr(module, name)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn:
        return weight
    scale_inv = getattr(module, name + "_scale_inv")
    delattr(module, name + "_scale_inv")
    return backend.pack_fp8(weight, scale_inv, block, dtype)


def _replace(module: torch.nn.Module, name: str, packed) -> None:
    """Put a packed weight in place of the parameter (as a plain attribute); an unchanged one stays."""
    if packed is not getattr(module, name):
        delattr(module, name)
        setattr(module, name, packed)


class OnLoad:
    """Quantization on load, the hook moela.loader.load_model calls: every weight prepare() would quantize
    is packed as it is read, one checkpoint tensor at a time, and never exists in the model dtype (an
    FP8 or FP4 checkpoint goes through fp32 to codes, tensor by tensor). Peak memory: the quantized model
    plus one checkpoint tensor and its temporaries (and a gate half waiting for its up half).

        model = load_model(path, cfg=cfg, hook=OnLoad(backend, "int8"))
        prepare(model, backend, "int8")            # binds the ops; packed weights stay as they are
    """

    def __init__(self, backend: Backend, quantization: str):
        self.backend, self.quantization = backend, quantization
        self.slots: dict[str, tuple[nn.Module, str]] = {}  # parameter name -> (module, attribute) to fill
        self.halves: dict[tuple, dict[int, torch.Tensor]] = {}

    def claim(self, model: nn.Module) -> None:
        """Replace each parameter that prepare() quantizes (the model is still on the meta device) by an
        empty slot: None, or a list of None per expert. The loader allocates only what is left."""
        for prefix, module in model.named_modules():
            if isinstance(module, Linear) and not module.sliced:
                self.slots[f"{prefix}.weight"] = (module, "weight")
                _replace(module, "weight", None)
            elif isinstance(module, Experts):
                for attr in ("w13", "w2"):
                    self.slots[f"{prefix}.{attr}"] = (module, attr)
                    _replace(module, attr, [None] * len(getattr(module, attr)))

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
