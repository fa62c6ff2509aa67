"""The op surface the model calls, and the backends behind it, chosen once at engine start.

    from moela import ops
    backend = ops.select("auto", torch.device("cpu"), torch.bfloat16)   # -> the "cpu" backend here
    quantize.prepare(model, backend)      # weights into the backend's layout; every layer calls its ops
    backend.linear(x, weight)             # what a layer does inside: self.ops.linear(...)

A backend is a module of this package with some of the functions in OPS under the same names and
signatures; `load` fills the rest from `reference.py`, the plain-PyTorch ground truth that runs on
any device. `reference.py` documents each op. A backend module may also define
`available(device, dtype) -> str | None` (why it cannot run there, or None) and `setup()` (process
settings it wants, applied by `select`), and may fail to import where its library is absent;
`select` then says which and why. Ops know tensors, never model classes. `npu.py` (torch_npu) is
imported only for device "npu" (`load_device`) or when named; `export.py` holds graph-friendly ops
for moela/export.py and is no engine backend.

| op | what |
|---|---|
| linear, pack_linear | x @ W^T; pack_linear puts W in the layout linear reads (once, at start-up), quantized if asked (backends that quantize: `quantizes`) |
| pack_fp8 | an FP8 block-quantized checkpoint weight in the form pack_linear and pack_experts take |
| rms_norm, add_rms_norm, rope | RMSNorm (HF's rounding), the same after a residual add, rotary embedding on the rope dims |
| causal_attention | one prompt's causal attention on decompressed K/V (the naive MLA prefill) |
| store_latent, latent_attention | write the MLA latent into the paged cache; absorbed attention over it |
| indexer_topk, sparse_latent_attention | V3.2's lightning indexer, and absorbed attention over the rows it picks |
| index_scores, sink_attention | V4's indexer scores, and its attention with a per-head sink (keys are values) |
| moe, pack_experts | the routed experts of a step's tokens; pack_experts as pack_linear |
| plan | this step's index plans, built by the runner before the forward so no layer copies to the device |
"""

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from moela.errors import MoelaError
from moela.ops import reference

BACKENDS = ("reference", "cpu", "triton", "npu")  # every engine backend module (export.py: graph tracing only)
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("triton",), "npu": ("npu",)}  # device type -> backends "auto" tries before the reference
DEVICE_LIBRARIES = {"npu": "npu"}  # device type -> the backend module whose import registers it with torch


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable
    pack_linear: Callable
    pack_fp8: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    causal_attention: Callable
    store_latent: Callable
    latent_attention: Callable
    indexer_topk: Callable
    sparse_latent_attention: Callable
    index_scores: Callable
    sink_attention: Callable
    moe: Callable
    pack_experts: Callable
    plan: Callable

    def implemented(self) -> list[str]:
        """The ops this backend defines itself (the others are the reference's)."""
        return [op for op in OPS if getattr(self, op) is not getattr(REFERENCE, op)]


OPS = tuple(f.name for f in fields(Backend) if f.name != "name")


class BackendUnavailable(MoelaError):
    """A backend that cannot run here: its library is missing, or the device or dtype is not its own."""


def load(name: str) -> Backend:
    """The backend `name` with the reference filling the ops it leaves out (ImportError if its library is absent)."""
    if name not in BACKENDS:
        raise ValueError(f"backend = {name!r} is invalid: must be 'auto' or one of {', '.join(BACKENDS)}")
    return backend_of(name, importlib.import_module(f"moela.ops.{name}"))


def backend_of(name: str, module) -> Backend:
    """The ops `module` defines, the reference's for the rest (also for modules outside BACKENDS, such as
    the export-only ops of moela/ops/export.py)."""
    return Backend(name, **{op: getattr(module, op, getattr(reference, op)) for op in OPS})


def load_device(device: str) -> None:
    """Register a device type torch only knows once a library is imported ("npu": torch_npu), so that
    torch.device(device) works; nothing for the others."""
    name = DEVICE_LIBRARIES.get(str(device).split(":")[0])
    if name:
        try:
            importlib.import_module(f"moela.ops.{name}")
        except ImportError as e:
            raise BackendUnavailable(f"device {device!r} needs its library: {e}") from None


def quantizes(backend: Backend) -> bool:
    """Whether the backend runs weight-only int8/int4 weights: its pack_linear and pack_experts take
    `quantization`, and its linear and moe come from the same module as they (so read what they write)."""
    pairs = ((backend.pack_linear, backend.linear), (backend.pack_experts, backend.moe))
    return all("quantization" in inspect.signature(p).parameters and p.__module__ == f.__module__ for p, f in pairs)


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        module = importlib.import_module(f"moela.ops.{name}")
    except ImportError as e:
        return f"its library is not installed ({e})"
    check = getattr(module, "available", None)
    return check(device, dtype) if check else None


def select(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """`name`, or for "auto" the first backend of the device's list that can run here, else the reference;
    the chosen backend's `setup()` runs once."""
    if name == "auto":
        usable = [b for b in AUTO_ORDER.get(device.type, ()) if why_unavailable(b, device, dtype) is None]
        name = usable[0] if usable else "reference"
    if name not in BACKENDS:
        raise ValueError(f"backend = {name!r} is invalid: must be 'auto' or one of {', '.join(BACKENDS)}")
    reason = why_unavailable(name, device, dtype)
    if reason:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device} with {dtype}: {reason}")
    backend = load(name)
    getattr(importlib.import_module(f"moela.ops.{name}"), "setup", lambda: None)()
    return backend


def device_memory(device: torch.device) -> int:
    """Total memory of the device in bytes (physical RAM for the CPU)."""
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "mem_get_info"):
        raise ValueError(f"cannot read the memory of device {device}: give kv_cache_memory explicitly")
    return module.mem_get_info(device)[1]


REFERENCE = load("reference")
