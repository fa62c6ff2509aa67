"""safetensors checkpoint -> model, and model -> HF-format checkpoint (names: moela/names.py).

    model = load_model("path/to/model", dtype=torch.bfloat16)

The model is built on the meta device, materialized empty in the target dtype, then filled tensor
by tensor from memory-mapped files: peak memory is the model plus one tensor. Every header is
checked and every name and shape matched against the config before a byte of weights is read, so
a bad checkpoint fails with a CheckpointError naming the file and tensor, never half-loaded.
Dequantized on load: FP8 e4m3 weights with 128x128 block scales (fp32 `weight_scale_inv`, or V4's
power-of-two UE8M0 `.scale`) and V4's FP4 e2m1 experts (two per byte, 1x32 UE8M0 scales). With
keep_fp8 (the engine's choice), FP8 projection and expert weights stay e4m3 with their scales beside
them, for quantize.prepare to hand to the backend's pack_fp8 (which keeps or dequantizes them). MTP
layers are skipped.
"""

import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moela.config import ModelConfig
from moela.errors import CheckpointError
from moela.models import Transformer, build_model
from moela.models.layers import Experts, Linear
from moela.names import LAYER_RE, MTP_NAMES, hf_names, map_name, to_hf, v4_target
from moela.ops import reference

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
PACKED = ("F4", "I8", "U8")  # how FP4 experts come: two e2m1 values per byte (F4 counts values, I8/U8 bytes)
MAX_HEADER = 100 * 1024 * 1024
MAP_BYTES = 64 * 2**20  # a file is mapped afresh after this many bytes: pages read through a mapping count in RSS while it lives
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])

def read_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Validate a safetensors header; return {name: (dtype, shape)}."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{file}: corrupt safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw_len, "little")
        if n > MAX_HEADER or n > size - 8:
            raise CheckpointError(f"{file}: corrupt safetensors header (length {n} exceeds the file or the {MAX_HEADER}-byte limit)")
        raw = f.read(n)

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise CheckpointError(f"{file}: corrupt safetensors header (tensor '{dup}' appears twice)")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return _check_entries(file, header, size - 8 - n)


def _check_entries(file: Path, header: dict, data_size: int) -> dict[str, tuple[str, list[int]]]:
    out, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            assert dtype in SAFETENSORS_DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
            assert isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size
        except (KeyError, TypeError, ValueError, AssertionError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor '{name}': {info!r}") from None
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize // (2 if dtype == "F4" else 1)
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: tensor '{name}' has {end - begin} bytes but dtype {dtype} x shape {shape} needs {nbytes}")
        spans.append((begin, end, name))
        out[name] = (dtype, shape)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{file}: tensors '{n0}' and '{n1}' overlap in the data section")
    return out


def checkpoint_files(path: Path) -> dict[str, Path]:
    """{tensor name: file} for a single model.safetensors or a sharded directory with an index."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: corrupt index (expected a JSON object with a 'weight_map')") from None
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{index}: shard '{shard}' is listed but missing from {path}")
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single for name in read_header(single)}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(f"{path / pickles[0]}: pickle checkpoints are refused (they can run code); convert to safetensors")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
               cfg: ModelConfig | None = None, keep_fp8: bool = False, hook=None) -> Transformer:
    """`hook` (quantization on load: moela.quantize.OnLoad) takes weights as they are read: hook.claim(model)
    empties the parameters it will fill before the rest is allocated, then hook.take((our name, expert,
    half), tensor) -> True for each tensor it keeps itself (FP8 and FP4 ones come dequantized to fp32)."""
    path = Path(path)
    cfg = cfg or ModelConfig.from_pretrained(path)
    where = checkpoint_files(path)
    headers = {f: read_header(f) for f in sorted(set(where.values()))}
    for name, f in where.items():
        if name not in headers[f]:
            raise CheckpointError(f"{f}: tensor '{name}' is listed in the index but not in this file")
    model = build_model(cfg, dtype, "meta")
    plan = (_plan_v4 if cfg.v4 else _plan)(cfg, model, where, headers)  # every check before any allocation
    if hook:
        hook.claim(model)
    kept = _fp8_params(cfg, model, plan, headers) if keep_fp8 and not hook else {}
    _materialize(model, kept, device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    handles: dict[Path, object] = {}
    files = sorted({f for f, _ in plan.values()})
    with torch.no_grad():
        for f in tqdm(files, desc="Loading shards", unit="shard", disable=len(files) < 2):
            for hf_name, (src, target) in plan.items():
                if src == f:
                    tensor, scale = _read(hf_name, where, handles, cfg, keep_fp8=target[0] in kept)
                    if hook and hook.take(target, tensor):
                        continue
                    _destination(params, target).copy_(tensor)
                    if scale is not None:
                        _destination(params, (target[0] + "_scale_inv", *target[1:])).copy_(scale)
    return model.eval()


def _fp8_params(cfg: ModelConfig, model: Transformer, plan: dict, headers: dict) -> dict[str, tuple[int, ...]]:
    """{parameter: its scales' shape} for the projection and expert weights read wholly from FP8 tensors
    whose scale blocks do not straddle a fused gate/up boundary."""
    bo, bi = cfg.quantization.weight_block_size if cfg.quantization else (128, 128)
    sources: dict[str, list] = {}
    for hf_name, (f, (name, _, half)) in plan.items():
        sources.setdefault(name, []).append((headers[f][hf_name][0], half))
    kept = {}
    for name, srcs in sources.items():
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        shape = getattr(module, attr).shape
        fits = (isinstance(module, Linear) and attr == "weight") or (isinstance(module, Experts) and attr in ("w13", "w2"))
        aligned = all(half is None for _, half in srcs) or (shape[-2] // 2) % bo == 0
        if fits and aligned and all(dtype == "F8_E4M3" for dtype, _ in srcs):
            kept[name] = (*shape[:-2], math.ceil(shape[-2] / bo), math.ceil(shape[-1] / bi))
    return kept


def _materialize(model: Transformer, kept: dict[str, tuple[int, ...]], device: torch.device | str) -> None:
    """Allocate the meta-built model on device, the kept parameters as e4m3 with a `<name>_scale_inv` buffer each."""
    for name, scale_shape in kept.items():
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        fp8 = torch.empty(getattr(module, attr).shape, dtype=torch.float8_e4m3fn, device="meta")
        setattr(module, attr, torch.nn.Parameter(fp8, requires_grad=False))
        module.register_buffer(attr + "_scale_inv", torch.empty(scale_shape, device="meta"))
    model.to_empty(device=device)
    model.init_buffers()


def _plan(cfg: ModelConfig, model: Transformer, where: dict[str, Path], headers: dict) -> dict:
    """Match every checkpoint tensor to a parameter slice and check shapes, before loading anything."""
    shapes = {n: list(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    present = {n for n in where if not n.endswith("weight_scale_inv")}
    mtp = {n for n in present if (m := LAYER_RE.fullmatch(n)) and int(m[1]) >= cfg.num_hidden_layers}
    if mtp:
        layers = sorted({int(LAYER_RE.fullmatch(n)[1]) for n in mtp})
        log.debug("skipping %d tensors of the MTP layer(s) %s (not used for inference)", len(mtp), layers)
    present -= mtp
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        present.discard("lm_head.weight")  # tied: the embedding is the head
    expected = hf_names(cfg, fused_experts=any(n.endswith("mlp.experts.gate_up_proj") for n in present))
    for name in expected:
        if name not in present:
            raise CheckpointError(f"{next(iter(where.values())).parent}: missing tensor '{name}' (checkpoint incomplete for this config)")
    extra = present - set(expected)
    if extra:
        name = sorted(extra)[0]
        raise CheckpointError(f"{where[name]}: unexpected tensor '{name}' for this config")
    plan = {}
    for hf_name in expected:
        target = map_name(hf_name)
        name, expert, half = target
        want = shapes[name][1:] if expert is not None else list(shapes[name])
        if half is not None:
            want[0] //= 2
        f = where[hf_name]
        dtype, shape = headers[f][hf_name]
        if list(shape) != want:
            raise CheckpointError(f"{f}: tensor '{hf_name}' has shape {shape}, expected {want}")
        if dtype == "F8_E4M3" and hf_name + "_scale_inv" not in where:
            raise CheckpointError(f"{f}: FP8 tensor '{hf_name}' has no '{hf_name}_scale_inv'")
        plan[hf_name] = (f, target)
    return plan


def _plan_v4(cfg: ModelConfig, model: torch.nn.Module, where: dict[str, Path], headers: dict) -> dict:
    """Match every V4 tensor (DeepSeek's names or transformers') to a parameter slice; check shapes, and that
    the slices fill every parameter exactly once, before loading anything."""
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
    plan, filled = {}, {}
    for name, f in where.items():
        if _is_scale(name, where) or name.startswith(("mtp.", "model.mtp.")):
            continue  # scales are read with their weights; the MTP module is not used for inference
        target = v4_target(name)
        param, expert, half = target
        if param not in shapes:
            raise CheckpointError(f"{f}: unexpected tensor '{name}' for this config")
        want = shapes[param][1:] if expert is not None else list(shapes[param])
        if half is not None:
            want[0] //= 2
        dtype, shape = headers[f][name]
        packed = dtype in PACKED and dtype != "F4" and shape[:-1] == want[:-1] and 2 * shape[-1] == want[-1]
        if list(shape) != want and not packed:
            raise CheckpointError(f"{f}: tensor '{name}' has shape {shape}, expected {want}")
        if (dtype in ("F8_E4M3", "F4") or packed) and _scale_name(name, where) is None:
            raise CheckpointError(f"{f}: quantized tensor '{name}' has no block scale ('.scale' or '_scale_inv')")
        if target in filled:
            raise CheckpointError(f"{f}: tensor '{name}' fills '{param}' a second time")
        filled[target], plan[name] = math.prod(want), (f, target)
    for param, shape in shapes.items():
        if sum(n for (p, _, _), n in filled.items() if p == param) != math.prod(shape):
            raise CheckpointError(f"{next(iter(where.values())).parent}: missing tensors of '{param}' "
                                  "(checkpoint incomplete for this config)")
    return plan


def _is_scale(name: str, where: dict) -> bool:
    """A block scale: `X.weight_scale_inv`, or `X.scale` beside an `X.weight` (mHC's `attn_hc.scale` is none)."""
    return name.endswith("_scale_inv") or name.endswith(".scale") and name.removesuffix(".scale") + ".weight" in where


def _scale_name(name: str, where: dict) -> str | None:
    """The block scale of a quantized weight: transformers' `X.weight_scale_inv` or DeepSeek's `X.scale`."""
    return next((s for s in (name + "_scale_inv", name.removesuffix(".weight") + ".scale") if s in where), None)


def _read(hf_name: str, where: dict[str, Path], handles: dict, cfg: ModelConfig,
          keep_fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, None), a quantized one dequantized to fp32; with keep_fp8, (e4m3 tensor, its scales) for an FP8 one."""
    def get(name: str) -> torch.Tensor:
        f = where[name]
        if f not in handles:
            handles[f] = [safe_open(str(f), framework="pt"), 0]
        tensor = handles[f][0].get_tensor(name)
        handles[f][1] += tensor.nbytes
        if handles[f][1] > MAP_BYTES:
            del handles[f]  # unmapped once the tensors read through it are gone
        return tensor

    tensor, what = get(hf_name), f"{where[hf_name]}: tensor '{hf_name}'"
    if tensor.dtype == torch.float8_e4m3fn:
        block = cfg.quantization.weight_block_size if cfg.quantization else (128, 128)
        scale = get(_scale_name(hf_name, where))
        check_fp8_scales(tensor, scale, block, what)
        return (tensor, scale) if keep_fp8 else (reference.pack_fp8(tensor, scale, block, torch.float32), None)
    if tensor.dtype in (torch.float4_e2m1fn_x2, torch.int8, torch.uint8) and _scale_name(hf_name, where):
        return dequantize_fp4(tensor, get(_scale_name(hf_name, where)), what), None
    return tensor, None


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, what: str, block: int = 32) -> torch.Tensor:
    """W[i, 2j], W[i, 2j+1] = e2m1 values of byte [i, j]'s low and high nibble, times S[i, j * 2 // block]."""
    codes = packed.view(torch.uint8)
    out_dim, in_dim = codes.shape[0], 2 * codes.shape[1]
    if tuple(scale.shape) != (out_dim, math.ceil(in_dim / block)):
        raise CheckpointError(f"{what}: its FP4 scale has shape {list(scale.shape)}, expected "
                              f"{[out_dim, math.ceil(in_dim / block)]}")
    values = FP4_VALUES[torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).long()]  # [out, in]
    return values * scale.float().repeat_interleave(block, 1)[:, :in_dim]


def check_fp8_scales(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], what: str) -> None:
    want = (math.ceil(weight.shape[0] / block[0]), math.ceil(weight.shape[1] / block[1]))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{what}: weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)}")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], what: str) -> torch.Tensor:
    """W[i, j] = fp32(Wq[i, j]) * S[i // bo, j // bi] in fp32; edge blocks may be ragged."""
    check_fp8_scales(weight, scale_inv, block, what)
    return reference.pack_fp8(weight, scale_inv, block, torch.float32)


def _destination(params: dict[str, torch.Tensor], target: tuple) -> torch.Tensor:
    name, expert, half = target
    dest = params[name]
    if expert is not None:
        dest = dest[expert]
    if half is not None:
        rows = dest.shape[0] // 2
        dest = dest[half * rows : (half + 1) * rows]
    return dest


def _mtp_state(mtp: torch.nn.Module, n_layers: int) -> dict[str, torch.Tensor]:
    """MTP parameters named as layer n_layers of the model: block.X -> layers.L.X, enorm -> layers.L.enorm."""
    return {f"layers.{n_layers}.{name.removeprefix('block.')}": t for name, t in mtp.state_dict().items()}


ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "kimi_k2": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}


def save_model(model: Transformer, path: str | Path, mtp: torch.nn.Module | None = None,
               dtype: torch.dtype | None = None, config: dict | None = None) -> Path:
    """Write path/model.safetensors with HF names (per-expert tensors; the gate bias stays fp32) and, given
    the HF config dict the model was built from, path/config.json (loadable by moela and transformers)."""
    from safetensors.torch import save_file

    if model.cfg.model_type == "deepseek_v4":
        raise CheckpointError(f"cannot save {path}: writing DeepSeek-V4 checkpoints is not supported (V2, V3 and V3.2 are)")
    state = dict(model.state_dict())
    if mtp is not None:
        state |= _mtp_state(mtp, model.cfg.num_hidden_layers)
    tensors = {}
    for name, t in to_hf(state).items():
        keep = dtype is None or name.endswith("e_score_correction_bias")
        tensors[name] = t.detach().to("cpu", t.dtype if keep else dtype, copy=True).contiguous()  # views share storage
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        config = config | {"architectures": [ARCHITECTURES[model.cfg.model_type]],
                           "dtype": str(dtype or model.embed.weight.dtype).removeprefix("torch.")}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path / "model.safetensors"


def load_mtp(mtp: torch.nn.Module, path: str | Path, cfg: ModelConfig) -> None:
    """Fill an MTP module from layer cfg.num_hidden_layers of a checkpoint (the layer load_model skips)."""
    path = Path(path)
    where = checkpoint_files(path)
    expected = to_hf(_mtp_state(mtp, cfg.num_hidden_layers))
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    missing = sorted(set(expected) - set(where))
    if missing:
        raise CheckpointError(f"{path}: missing MTP tensor '{missing[0]}' (checkpoint has no MTP layer for this config)")
    extra = sorted(n for n in where if n.startswith(prefix) and n not in expected and not n.endswith("_scale_inv"))
    if extra:
        raise CheckpointError(f"{where[extra[0]]}: unexpected MTP tensor '{extra[0]}' for this config")
    params = _mtp_state(mtp, cfg.num_hidden_layers)  # shares storage with mtp's parameters
    mtp_names = {hf: ours for ours, hf in MTP_NAMES.items()}
    handles: dict[Path, object] = {}
    with torch.no_grad():
        for hf_name, want in expected.items():
            rest = hf_name[len(prefix):]
            target = (prefix[6:] + mtp_names[rest], None, None) if rest in mtp_names else map_name(hf_name)
            tensor = _read(hf_name, where, handles, cfg)[0]
            if tensor.shape != want.shape:
                raise CheckpointError(f"{where[hf_name]}: tensor '{hf_name}' has shape {list(tensor.shape)}, expected {list(want.shape)}")
            _destination(params, target).copy_(tensor)
