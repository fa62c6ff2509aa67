"""HF safetensors checkpoint -> Transformer. The only place HF tensor names appear.

    model = load_model("path/to/model", dtype=torch.bfloat16)

The model is built on the meta device, materialized empty in the target dtype, then filled tensor
by tensor from memory-mapped files: peak memory is the model plus one tensor. Every header is
checked and every name and shape matched against the config before a byte of weights is read, so
a bad checkpoint fails with a CheckpointError naming the file and tensor, never half-loaded.
FP8 e4m3 weights with block `weight_scale_inv` are dequantized on load; MTP layers are skipped.
"""

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moela.config import ModelConfig
from moela.errors import CheckpointError
from moela.models import Transformer, build_model

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024
MAP_BYTES = 64 * 2**20  # a file is mapped afresh after this many bytes: pages read through a mapping count in RSS while it lives

# HF name (inside model.layers.N.) -> (our name, which half of a fused gate/up matrix or None)
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "self_attn.q_proj.weight": ("attn.wq.weight", None),
    "self_attn.q_a_proj.weight": ("attn.wq_a.weight", None),
    "self_attn.q_a_layernorm.weight": ("attn.q_norm.weight", None),
    "self_attn.q_b_proj.weight": ("attn.wq_b.weight", None),
    "self_attn.kv_a_proj_with_mqa.weight": ("attn.wkv_a.weight", None),
    "self_attn.kv_a_layernorm.weight": ("attn.kv_norm.weight", None),
    "self_attn.kv_b_proj.weight": ("attn.wkv_b.weight", None),
    "self_attn.o_proj.weight": ("attn.wo.weight", None),
    "mlp.gate_proj.weight": ("ffn.w13.weight", 0),
    "mlp.up_proj.weight": ("ffn.w13.weight", 1),
    "mlp.down_proj.weight": ("ffn.w2.weight", None),
    "mlp.gate.weight": ("ffn.gate.weight", None),
    "mlp.gate.e_score_correction_bias": ("ffn.gate.bias", None),
    "mlp.shared_experts.gate_proj.weight": ("ffn.shared_experts.w13.weight", 0),
    "mlp.shared_experts.up_proj.weight": ("ffn.shared_experts.w13.weight", 1),
    "mlp.shared_experts.down_proj.weight": ("ffn.shared_experts.w2.weight", None),
    "mlp.experts.gate_up_proj": ("ffn.experts.w13", None),  # transformers' fused layout
    "mlp.experts.down_proj": ("ffn.experts.w2", None),
}
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "head.weight"}


def map_name(hf_name: str) -> tuple[str, int | None, int | None] | None:
    """HF tensor name -> (our parameter, expert index or None, gate/up half or None); None if unknown."""
    if hf_name in _TOP:
        return _TOP[hf_name], None, None
    m = _LAYER.fullmatch(hf_name)
    if not m:
        return None
    prefix, rest = f"layers.{m[1]}.", m[2]
    if e := _EXPERT.fullmatch(rest):
        proj = e[2]
        name = "ffn.experts.w2" if proj == "down_proj" else "ffn.experts.w13"
        return prefix + name, int(e[1]), (None if proj == "down_proj" else int(proj == "up_proj"))
    if rest in _LAYER_NAMES:
        name, half = _LAYER_NAMES[rest]
        return prefix + name, None, half
    return None


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
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
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
               cfg: ModelConfig | None = None, hook=None) -> Transformer:
    """`hook` (quantization on load: moela.quantize.OnLoad) builds the model instead (on the CPU) and
    takes the tensors it wants as they are read: hook.build(cfg, dtype) -> model, then
    hook.take((our name, expert, half), tensor) -> True for each tensor it keeps itself."""
    path = Path(path)
    cfg = cfg or ModelConfig.from_pretrained(path)
    where = checkpoint_files(path)
    headers = {f: read_header(f) for f in sorted(set(where.values()))}
    for name, f in where.items():
        if name not in headers[f]:
            raise CheckpointError(f"{f}: tensor '{name}' is listed in the index but not in this file")
    plan = _plan(cfg, build_model(cfg, dtype, "meta"), where, headers)  # every check before any allocation
    model = hook.build(cfg, dtype) if hook else build_model(cfg, dtype, device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    handles: dict[Path, object] = {}
    files = sorted({f for f, _ in plan.values()})
    with torch.no_grad():
        for f in tqdm(files, desc="Loading shards", unit="shard", disable=len(files) < 2):
            for hf_name, (src, target) in plan.items():
                if src == f:
                    tensor = _read(hf_name, where, handles, cfg)
                    if hook is None or not hook.take(target, tensor):
                        _destination(params, target).copy_(tensor)
    return model.eval()


def hf_names(cfg: ModelConfig, fused_experts: bool = False) -> list[str]:
    """Every tensor name a complete checkpoint for cfg holds (MTP layers and FP8 scales aside)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    attn = ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
    attn += ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{a}.weight" for a in attn]
        mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        if cfg.is_moe_layer(i):
            mlp = ["mlp.gate"] + [f"mlp.shared_experts.{w}" for w in ("gate_proj", "up_proj", "down_proj") if cfg.n_shared_experts]
            if fused_experts:
                names += [p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"]
            else:
                names += [f"{p}mlp.experts.{e}.{w}.weight" for e in range(cfg.n_routed_experts) for w in ("gate_proj", "up_proj", "down_proj")]
            if cfg.topk_method == "noaux_tc":
                names.append(p + "mlp.gate.e_score_correction_bias")
        names += [f"{p}{m}.weight" for m in mlp]
    return names


def _plan(cfg: ModelConfig, model: Transformer, where: dict[str, Path], headers: dict) -> dict:
    """Match every checkpoint tensor to a parameter slice and check shapes, before loading anything."""
    shapes = {n: list(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    present = {n for n in where if not n.endswith("weight_scale_inv")}
    mtp = {n for n in present if (m := _LAYER.fullmatch(n)) and int(m[1]) >= cfg.num_hidden_layers}
    if mtp:
        layers = sorted({int(_LAYER.fullmatch(n)[1]) for n in mtp})
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


def _read(hf_name: str, where: dict[str, Path], handles: dict, cfg: ModelConfig) -> torch.Tensor:
    def get(name: str) -> torch.Tensor:
        f = where[name]
        if f not in handles:
            handles[f] = [safe_open(str(f), framework="pt"), 0]
        tensor = handles[f][0].get_tensor(name)
        handles[f][1] += tensor.nbytes
        if handles[f][1] > MAP_BYTES:
            del handles[f]  # unmapped once the tensors read through it are gone
        return tensor

    tensor = get(hf_name)
    if tensor.dtype == torch.float8_e4m3fn:
        block = cfg.quantization.weight_block_size if cfg.quantization else (128, 128)
        tensor = dequantize_fp8(tensor, get(hf_name + "_scale_inv"), block, f"{where[hf_name]}: tensor '{hf_name}'")
    return tensor


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], what: str) -> torch.Tensor:
    """W[i, j] = fp32(Wq[i, j]) * S[i // bo, j // bi]; edge blocks may be ragged."""
    out_dim, in_dim = weight.shape
    bo, bi = block
    want = (math.ceil(out_dim / bo), math.ceil(in_dim / bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{what}: weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)}")
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out_dim].repeat_interleave(bi, 1)[:, :in_dim]
    return weight.float() * scale


def _destination(params: dict[str, torch.Tensor], target: tuple) -> torch.Tensor:
    name, expert, half = target
    dest = params[name]
    if expert is not None:
        dest = dest[expert]
    if half is not None:
        rows = dest.shape[0] // 2
        dest = dest[half * rows : (half + 1) * rows]
    return dest


# Saving: our parameter names -> HF names, the inverse of the table above. The MTP module (its own
# norms and projection around a full Block) is stored as layer num_hidden_layers, as DeepSeek-V3 does.
_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "norm.weight": "shared_head.norm.weight"}


def _inverse_layer_names() -> dict[str, list[tuple[str, int | None]]]:
    """Our name inside a layer -> [(HF name, gate/up half or None)]; experts are split separately."""
    inverse: dict[str, list[tuple[str, int | None]]] = {}
    for hf, (ours, half) in _LAYER_NAMES.items():
        if not hf.startswith("mlp.experts."):
            inverse.setdefault(ours, []).append((hf, half))
    return inverse


_OURS = _inverse_layer_names()


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors: fused gate/up split in halves, stacked experts split per expert."""
    top = {ours: hf for hf, ours in _TOP.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        p = f"model.layers.{layer}."
        if rest == "ffn.experts.w2":
            out.update({f"{p}mlp.experts.{e}.down_proj.weight": w for e, w in enumerate(t)})
        elif rest == "ffn.experts.w13":
            for e, w in enumerate(t):
                gate, up = w.chunk(2)  # [2I, d] -> gate rows, up rows
                out[f"{p}mlp.experts.{e}.gate_proj.weight"], out[f"{p}mlp.experts.{e}.up_proj.weight"] = gate, up
        elif rest in _MTP_NAMES:
            out[p + _MTP_NAMES[rest]] = t
        else:
            out.update({p + hf: (t if half is None else t.chunk(2)[half]) for hf, half in _OURS[rest]})
    return out


def _mtp_state(mtp: torch.nn.Module, n_layers: int) -> dict[str, torch.Tensor]:
    """MTP parameters named as layer n_layers of the model: block.X -> layers.L.X, enorm -> layers.L.enorm."""
    return {f"layers.{n_layers}.{name.removeprefix('block.')}": t for name, t in mtp.state_dict().items()}


ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "kimi_k2": "DeepseekV3ForCausalLM"}


def save_model(model: Transformer, path: str | Path, mtp: torch.nn.Module | None = None,
               dtype: torch.dtype | None = None, config: dict | None = None) -> Path:
    """Write path/model.safetensors with HF names (per-expert tensors; the gate bias stays fp32) and, given
    the HF config dict the model was built from, path/config.json (loadable by moela and transformers)."""
    from safetensors.torch import save_file

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
    mtp_names = {hf: ours for ours, hf in _MTP_NAMES.items()}
    handles: dict[Path, object] = {}
    with torch.no_grad():
        for hf_name, want in expected.items():
            rest = hf_name[len(prefix):]
            target = (prefix[6:] + mtp_names[rest], None, None) if rest in mtp_names else map_name(hf_name)
            tensor = _read(hf_name, where, handles, cfg)
            if tensor.shape != want.shape:
                raise CheckpointError(f"{where[hf_name]}: tensor '{hf_name}' has shape {list(tensor.shape)}, expected {list(want.shape)}")
            _destination(params, target).copy_(tensor)
