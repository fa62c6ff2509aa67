"""`moela export onnx`: a model as two ONNX graphs around its paged latent cache, for ONNX Runtime.

    moela export onnx ./DeepSeek-V2-Lite ./v2-lite-onnx --dtype float16
    export_onnx("path/to/model", "out", torch.float32)            # the same from Python
    LLM(model="out", runtime="onnx", provider="cpu")              # moela's engine around the graphs

A transform of a built model: the model is loaded as usual, its layers are bound to the graph-friendly
ops of moela/ops/export.py, and torch.onnx (dynamo) traces one engine step twice:

| graph | inputs | outputs |
|---|---|---|
| prefill.onnx | tokens, positions [B, S]; block_tables [B, blocks]; logit_rows [B, R]; kv_cache.N | logits [B, R, vocab]; kv_cache.N.new [B, S, width] |
| decode.onnx | tokens, positions [B]; block_tables [B, blocks]; kv_cache.N | logits [B, vocab]; kv_cache.N.new [B, width] |

B, S, R, blocks and the cache's num_blocks and block_size are dynamic. Each sequence's rows are its
next tokens, at positions running on from what its cache holds (positions[:, 0] tokens, in its
block_tables' blocks); shorter sequences are padded at the end. kv_cache.N is layer N's latent cache
[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] (V3.2's layers add indexer.k_cache.N, the
indexer's keys), read only: the graph returns the new rows (kv_cache.N.new) and the runtime writes them
at their slots, so no step copies the cache. V4's layers (moela/export_v4.py) cache per sequence too:
those graphs also take seq_slots [B] (and, prefill, lengths [B]: each sequence's real rows), read each
per-sequence cache at the slots and return its updated state [B, entries, width]. Weights are stored
once, in weights.data beside the graphs (ONNX external data that both graphs reference). manifest.json
records the dtype, opset, caches and graph signatures; the model's config.json and tokenizer files are
copied beside them, so the directory is a model directory for `--runtime onnx`.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from moela import export_v4, ops, quantize
from moela.config import DTYPES, HelpFormatter, ModelConfig, model_dir
from moela.errors import MoelaError
from moela.loader import load_model
from moela.models import StepContext, Transformer
from moela.models.layers import OpsModule
from moela.ops import export as export_ops
from moela.tokenizer import TOKENIZER_FILES

log = logging.getLogger(__name__)

MIN_OPSET = 20  # the dynamo exporter's translations (aten::rms_norm among them) need at least this
WEIGHTS = "weights.data"
ORT_DTYPES = (torch.float32, torch.float16)  # what ONNX Runtime's CPU kernels run (bfloat16: hardly any)
ALIGN = 4096  # tensor offsets in weights.data, so a runtime can map them from the page cache
GRAPHS = ("prefill", "decode")
CACHE_FIELDS = ("name", "kind", "width", "tokens_per_entry", "entries_per_sequence")  # a CacheSpec in the manifest (dtype: the graphs')


class StepGraph(nn.Module):
    """One engine step of `model` as traced: the caches in, their new rows and the logits out."""

    def __init__(self, model: Transformer, decode: bool):
        super().__init__()
        self.model, self.decode = model, decode
        self.backend = ops.backend_of("export", export_ops)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, logit_rows: torch.Tensor | None,
                seq_slots: torch.Tensor | None, lengths: torch.Tensor | None, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, written = self.model, []
        collect = dataclasses.replace(self.backend, store_latent=lambda cache, slots, latent: written.append(latent))
        for module in model.modules():
            if isinstance(module, OpsModule):
                module.ops = collect
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in model.layers]
        for (layer, name), cache in zip(cache_names(model), caches):
            per_layer[layer][name] = cache
        model.attach_cache(per_layer)
        specs = [spec for layer in model.cache_specs() for spec in layer]
        paged = next(i for i, spec in enumerate(specs) if spec.paged)  # its entries per block give the block size
        ctx = StepContext.padded(positions, block_tables, caches[paged].shape[1] * specs[paged].tokens_per_entry)
        if seq_slots is not None:  # per-sequence caches (V4): moela/export_v4.py reads these
            ctx.seq_slots, ctx.plans["lengths"] = seq_slots, torch.ones_like(seq_slots) if lengths is None else lengths
        hidden = model(tokens.flatten(), ctx.positions, ctx)  # [B*S, H]
        model.attach_cache(None)
        if not self.decode:
            hidden = hidden.view(*tokens.shape, -1)  # [B, S, H]
            hidden = hidden.gather(1, logit_rows[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, R, H]
        outputs = (rows if rows.dim() == 3 else rows.view(*tokens.shape, -1) for rows in written)  # [B, S or entries, width]
        return model.logits(hidden).float(), *outputs


def cache_names(model: Transformer) -> list[tuple[int, str]]:
    """(layer, CacheSpec name) of every cache tensor, in graph input order."""
    return [(i, spec.name) for i, specs in enumerate(model.cache_specs()) for spec in specs]


def example_inputs(model: Transformer, decode: bool) -> tuple[tuple, tuple, list[str], list[str]]:
    """(args, dynamic shapes, input names, output names) to trace one graph with. The example sizes are
    distinct and > 1, so the tracer keeps every dynamic dimension symbolic; S spans at least two entries
    of every compressed cache, so their new entries' count (ceil(S / rate)) is no 1 either."""
    specs = [(layer, spec) for layer, layer_specs in enumerate(model.cache_specs()) for spec in layer_specs]
    per_sequence = any(not spec.paged for _, spec in specs)  # V4: seq_slots (and lengths) join the inputs
    step = math.lcm(*(spec.tokens_per_entry for _, spec in specs if spec.paged))
    B, S, R, blocks, num_blocks, num_slots, block_size = 2, 7 + 2 * step, 3, 5, 11, 6, 4 * step
    shape = (B,) if decode else (B, S)
    positions = torch.arange(S).expand(B, S).contiguous() + torch.tensor([[6], [9]])
    args = [torch.randint(0, model.cfg.vocab_size, shape), positions[:, 0] if decode else positions,
            torch.arange(B * blocks).view(B, blocks), None if decode else torch.tensor([[0, 3, 6]] * B),
            torch.tensor([4, 1]) if per_sequence else None, None if decode or not per_sequence else torch.tensor([S, 4])]
    Dim = torch.export.Dim
    batch, num_blocks_dim, num_slots_dim = Dim("batch"), Dim("num_blocks"), Dim("num_slots")
    rows = {0: batch} if decode else {0: batch, 1: Dim("new_tokens")}
    dims = [rows, rows, {0: batch, 1: Dim("table_blocks")}, None if decode else {0: batch, 1: Dim("logit_rows")},
            {0: batch} if args[4] is not None else None, {0: batch} if args[5] is not None else None]
    entries = {n: Dim("block_size" if n == 1 else f"block_entries_{n}") for n in {spec.tokens_per_entry for _, spec in specs}}
    caches, cache_dims = [], []
    for _, spec in specs:
        dtype = spec.dtype or model.embed.weight.dtype
        if spec.paged:
            caches.append(torch.zeros(num_blocks, block_size // spec.tokens_per_entry, spec.width, dtype=dtype))
            cache_dims.append({0: num_blocks_dim, 1: entries[spec.tokens_per_entry]})
        else:
            caches.append(torch.zeros(num_slots, spec.entries_per_sequence, spec.width, dtype=dtype))
            cache_dims.append({0: num_slots_dim})
    names = ["tokens", "positions", "block_tables", "logit_rows", "seq_slots", "lengths"]
    inputs = [name for name, arg in zip(names, args) if arg is not None] + [f"{spec.name}.{layer}" for layer, spec in specs]
    outputs = ["logits"] + [f"{spec.name}.{layer}.new" for layer, spec in specs]
    return (*args, *caches), (*dims, tuple(cache_dims)), inputs, outputs


def export_onnx(model_path: str | Path, out: str | Path, dtype: torch.dtype = torch.float32, opset: int = MIN_OPSET) -> Path:
    """Write prefill.onnx, decode.onnx, weights.data, manifest.json, config.json and the tokenizer to out."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise MoelaError("moela export onnx needs onnx and onnxscript: pip install 'moela[onnx]'") from None
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset} is invalid: the exporter needs opset >= {MIN_OPSET}")
    src, out = model_dir(model_path), Path(out)
    cfg = ModelConfig.from_pretrained(src)
    model = load_model(src, dtype=dtype, cfg=cfg)
    quantize.prepare(model, ops.backend_of("export", export_ops))
    if cfg.model_type == "deepseek_v4":
        export_v4.bind(model)
    out.mkdir(parents=True, exist_ok=True)
    graphs, signatures = {}, {}
    for name in GRAPHS:
        args, dims, inputs, outputs = example_inputs(model, decode=name == "decode")
        log.info("tracing the %s graph (%d layers)", name, cfg.num_hidden_layers)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals (axis renaming, deprecations)
            program = torch.onnx.export(StepGraph(model, decode=name == "decode").eval(), args, dynamic_shapes=dims, dynamo=True,
                                        opset_version=opset, input_names=inputs, output_names=outputs, verbose=False,
                                        custom_translation_table={torch.ops.moela.moe.default: onnx_moe}, optimize=False)
        graphs[name], signatures[name] = program.model, {"inputs": inputs, "outputs": outputs}
    save_graphs(graphs, out)
    for file in ("config.json", *TOKENIZER_FILES):
        if (src / file).is_file():
            shutil.copy2(src / file, out / file)
    manifest = {"format": "moela-onnx", "version": 1, "dtype": str(dtype).removeprefix("torch."), "opset": opset,
                "model_type": cfg.model_type, "source": str(src),
                "caches": [[{field: getattr(spec, field) for field in CACHE_FIELDS} for spec in layer] for layer in model.cache_specs()],
                "graphs": {name: {"file": f"{name}.onnx", **sig} for name, sig in signatures.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def onnx_moe(x, weights, indices, w13: list, w2: list, limit: float | None = None):
    """moela::moe (moela/ops/export.py) in ONNX ops: the same loop over experts, each expert's rows from
    NonZero on its routing weights (a routed token whose weight is exactly 0 would add nothing anyway),
    each expert's weights initializers of their own; `limit` clamps the SwiGLU as V4's experts do."""
    from onnxscript import ir
    from onnxscript import opset20 as op

    n_experts = len(w13)
    shape = op.Concat(op.Shape(x, start=0, end=1), op.Constant(value_ints=[n_experts]), axis=0)
    routed = op.ScatterElements(op.ConstantOfShape(shape, value=ir.tensor([0.0])), indices, weights, axis=1)  # [T, E]
    routed = op.CastLike(op.Transpose(routed, perm=[1, 0]), x)  # [E, T]
    out = op.Expand(op.Constant(value_float=0.0), op.Shape(x))  # fp32 sums: ONNX Runtime's CPU ScatterND adds no float16
    for e in range(n_experts):
        weight = op.Gather(routed, op.Constant(value_int=e), axis=0)  # [T]
        rows = op.Transpose(op.NonZero(weight), perm=[1, 0])  # [n, 1]: the tokens routed to e
        g, u = op.Split(op.Gemm(op.GatherND(x, rows), w13[e], transB=1), num_outputs=2, axis=-1)  # [n, I] each
        if limit is not None:  # V4's clamped SwiGLU (reference.swiglu): gate <= limit, up in [-limit, limit]
            high, low = op.CastLike(op.Constant(value_float=limit), x), op.CastLike(op.Constant(value_float=-limit), x)
            g, u = op.Min(g, high), op.Clip(u, low, high)
        y = op.Gemm(op.Mul(op.Mul(g, op.Sigmoid(g)), u), w2[e], transB=1)  # [n, d]
        y = op.CastLike(op.Mul(y, op.Unsqueeze(op.GatherND(weight, rows), [1])), out)
        out = op.ScatterND(out, rows, y, reduction="add")
    return op.CastLike(out, x)


def save_graphs(graphs: dict, out: Path) -> None:
    """Each graph to out/<name>.onnx, every initializer in the one out/weights.data (equal tensors once)."""
    import onnx_ir as ir

    where: dict[bytes, int] = {}
    with open(out / WEIGHTS, "wb") as data:
        for model in graphs.values():
            for name, value in model.graph.initializers.items():
                tensor = value.const_value
                raw = tensor.tobytes()
                key = hashlib.blake2b(raw, digest_size=16).digest()
                if key not in where:
                    data.write(b"\0" * (-data.tell() % ALIGN))
                    where[key] = data.tell()
                    data.write(raw)
                value.const_value = ir.ExternalTensor(WEIGHTS, where[key], len(raw), tensor.dtype, shape=tensor.shape,
                                                      name=name, base_dir=out)
    for name, model in graphs.items():
        ir.save(model, out / f"{name}.onnx")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moela export", description="Export a model for another runtime.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="format", required=True)
    onnx = sub.add_parser("onnx", formatter_class=HelpFormatter, help="prefill and decode ONNX graphs around the latent cache",
                          description="Prefill and decode ONNX graphs of one engine step, the caches as inputs and their "
                                      "new rows (and per-sequence state) as outputs; run them with --runtime onnx.")
    onnx.add_argument("model", help="model directory (a checkpoint moela runs)")
    onnx.add_argument("out", help="directory to write the graphs, weights.data, manifest.json and the tokenizer to")
    onnx.add_argument("--dtype", choices=[k for k, v in DTYPES.items() if v in ORT_DTYPES], default="float32",
                      help="weight and cache dtype of the graphs")
    onnx.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):  # the exporter's progress notes
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        out = export_onnx(args.model, args.out, DTYPES[args.dtype], args.opset)
    except (MoelaError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = (out / WEIGHTS).stat().st_size
    print(f"wrote {out}: {', '.join(f'{g}.onnx' for g in GRAPHS)}, {WEIGHTS} ({size / 2**20:.1f} MiB), manifest.json; "
          f"run it with: moela generate --model {out} --runtime onnx \"...\"")
    return 0
