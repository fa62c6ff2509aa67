"""Every op of every backend against the plain PyTorch reference on random inputs (bf16 and fp32; on
the CPU and, where there is one, a CUDA GPU), then whole models: the CPU backend's packed weights
against the reference, and engine greedy tokens.

A backend whose library is absent, or that cannot run on this machine or dtype, is skipped with the
reason in the skip message (pytest -rs shows them)."""

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from conftest import engine_for, quantize_fp8, rel_err
from moela import ops, quantize
from moela.engine.sampler import SamplingParams
from moela.loader import load_model
from moela.models import StepContext

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
FP8_TOL = 0.05  # a backend may quantize activations to e4m3 per 1 x block for an FP8 weight's GEMM
CPU = torch.device("cpu")


def randn(*shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def paged_context(block_size: int = 4) -> StepContext:
    """Two decodes and one chunk after a cached prefix, on block tables that interleave their blocks."""
    q_lens, kv_lens = [1, 4, 1], [9, 11, 5]
    tables = torch.tensor([[3, 0, 7, 0], [1, 5, 9, 2], [4, 6, 0, 0]])
    positions = torch.cat([torch.arange(kv - q, kv) for q, kv in zip(q_lens, kv_lens)])
    return StepContext(positions=positions, q_lens=q_lens, kv_lens=kv_lens, block_tables=tables)


def op_inputs(op: str, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """Cases as (args, kwargs); weights go in unpacked: the test packs them with each backend."""
    if op == "linear":
        return [((randn(rows, 96, dtype=dtype), randn(80, 96, dtype=dtype, seed=1) / 10), {}) for rows in (1, 7)]
    if op == "pack_fp8":  # through linear: ragged 32 x 32 blocks, as a checkpoint stores them
        w, block = randn(80, 96, dtype=torch.float32, seed=1) / 10, (32, 32)
        return [((randn(rows, 96, dtype=dtype), *quantize_fp8(w, block), block), {}) for rows in (1, 7)]
    if op == "rms_norm":  # with a weight, and without (V4's)
        return [((randn(5, 3, 64, dtype=dtype), weight, 1e-6), {}) for weight in (1 + randn(64, dtype=dtype, seed=1) / 5, None)]
    if op == "add_rms_norm":  # the first input a strided view, as the model's slices are
        return [((randn(5, 80, dtype=dtype)[:, :64], randn(5, 64, dtype=dtype, seed=2), 1 + randn(64, dtype=dtype, seed=1) / 5,
                  1e-6), {})]
    if op == "rope":
        angles = randn(6, 8, dtype=torch.float32, seed=2) * 3
        return [((randn(6, 4, 16, dtype=dtype), angles.cos(), angles.sin(), inter), {}) for inter in (True, False)]
    if op == "causal_attention":
        return [((randn(3, 37, 24, dtype=dtype), randn(3, 37, 24, dtype=dtype, seed=1), randn(3, 37, 16, dtype=dtype, seed=2),
                  0.3), {})]
    if op == "store_latent":
        slots = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:10]
        return [((torch.zeros(10, 4, 20, dtype=dtype), slots, randn(10, 20, dtype=dtype)), {})]
    if op == "latent_attention":
        q, cache = randn(6, 3, 20, dtype=dtype), randn(10, 4, 20, dtype=dtype, seed=1)
        fresh = StepContext.prefill([4, 2])  # no cache: each sequence attends its own tokens
        fresh.naive_prefill = False
        return [((q, cache, randn(6, 20, dtype=dtype, seed=2), paged_context(), 0.2, 16), {}),
                ((q, None, randn(6, 20, dtype=dtype, seed=2), fresh, 0.2, 16), {})]
    if op == "indexer_topk":
        q, keys, weights = randn(6, 4, 8, dtype=dtype), randn(6, 8, dtype=dtype, seed=1), randn(6, 4, dtype=torch.float32, seed=2)
        return [((q, weights, randn(10, 4, 8, dtype=dtype, seed=3), keys, paged_context(), 3, 0.3), {})]
    if op == "sparse_latent_attention":
        picks = torch.tensor([[0, 7, -1], [2, 9, 5], [10, 1, -1], [0, 4, 8], [3, -1, -1], [1, 4, 0]])  # within each context
        own = torch.tensor([[0, -1, -1], [1, 0, -1], [2, 0, 1], [3, 1, -1], [0, -1, -1], [1, 0, -1]])  # of prefill([4, 2])
        fresh = StepContext.prefill([4, 2])
        fresh.naive_prefill = False
        return [((randn(6, 3, 20, dtype=dtype), randn(10, 4, 20, dtype=dtype, seed=1), randn(6, 20, dtype=dtype, seed=2),
                  picks, paged_context(), 0.2, 16), {}),
                ((randn(6, 3, 20, dtype=dtype), None, randn(6, 20, dtype=dtype, seed=2), own, fresh, 0.2, 16), {})]
    if op == "index_scores":
        return [((randn(5, 4, 8, dtype=dtype), randn(5, 4, dtype=torch.float32, seed=1), randn(7, 8, dtype=dtype, seed=2),
                  0.3), {})]
    if op == "sink_attention":
        mask = torch.rand(5, 9, generator=torch.Generator().manual_seed(3)) > 0.4
        mask[:, 0] = True
        extra_mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(4)) > 0.5
        return [((randn(5, 3, 16, dtype=dtype), randn(9, 16, dtype=dtype, seed=1), mask, randn(5, 4, 16, dtype=dtype, seed=2),
                  extra_mask, randn(3, dtype=torch.float32, seed=5), 0.25), {}),
                ((randn(5, 3, 16, dtype=dtype), randn(9, 16, dtype=dtype, seed=1), mask, None, None,
                  randn(3, dtype=torch.float32, seed=5), 0.25), {})]
    if op == "moe":
        T, E, k, d, inter = 9, 6, 3, 32, 8
        scores = randn(T, E, dtype=torch.float32, seed=4)
        weights, indices = scores.softmax(-1).topk(k, dim=-1)
        return [((randn(T, d, dtype=dtype), weights, indices, randn(E, 2 * inter, d, dtype=dtype, seed=5) / 5,
                  randn(E, d, inter, dtype=dtype, seed=6) / 3, *limit), {}) for limit in ((), (0.5,))]  # V4 clamps
    raise AssertionError(f"no inputs for op {op!r}")


TESTED = ("linear", "pack_fp8", "rms_norm", "add_rms_norm", "rope", "causal_attention", "store_latent", "latent_attention",
          "indexer_topk", "sparse_latent_attention", "index_scores", "sink_attention", "moe")


def test_every_op_has_inputs():
    assert set(TESTED) | {"pack_linear", "pack_experts", "plan"} == set(ops.OPS)  # plan: via latent_attention


def run_op(backend: ops.Backend, op: str, args: tuple):
    """Call the op as the model does: weights packed by the backend first; store_latent's result is its cache."""
    if op == "linear":
        return backend.linear(args[0], backend.pack_linear(args[1]))
    if op == "pack_fp8":
        x, w, scale, block = args
        return backend.linear(x, backend.pack_linear(backend.pack_fp8(w, scale, block, x.dtype)))
    if op == "add_rms_norm":
        return torch.stack(backend.add_rms_norm(*args))
    if op == "moe":
        return backend.moe(*args[:3], *backend.pack_experts(args[3], args[4]), *args[5:])
    if op == "store_latent":
        cache = args[0].clone()
        backend.store_latent(cache, *args[1:])
        return cache
    if op in ("latent_attention", "indexer_topk", "sparse_latent_attention"):
        ctx = args[4] if op != "latent_attention" else args[3]
        ctx.plans.clear()  # each backend builds its own plan, as the runner has it do before the forward
        ctx.block_size = None if args[1 if op != "indexer_topk" else 2] is None else 4
        backend.plan(ctx)
    return getattr(backend, op)(*args)


def on(device: torch.device, args: tuple) -> tuple:
    """The inputs on device, a StepContext's tensors included."""
    def move(a):
        if isinstance(a, StepContext):
            tables = None if a.block_tables is None else a.block_tables.to(device)
            return dataclasses.replace(a, positions=a.positions.to(device), block_tables=tables)
        return a.to(device) if isinstance(a, torch.Tensor) else a

    return tuple(move(a) for a in args)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", TESTED)
@pytest.mark.parametrize("name", ops.BACKENDS)
def test_op_matches_reference(name, op, dtype, device):
    try:
        backend = ops.load(name)
    except ImportError as e:
        pytest.skip(f"backend {name!r}: its library is not installed ({e})")
    reason = ops.why_unavailable(name, device, dtype)
    if reason:
        pytest.skip(f"backend {name!r} cannot run on {device} with {dtype}: {reason}")
    for args, _ in op_inputs(op, dtype):
        args = on(device, args)
        ours, ref = run_op(backend, op, args), run_op(ops.REFERENCE, op, args)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        if ref.dtype.is_floating_point:
            assert rel_err(ours, ref) < (FP8_TOL if op == "pack_fp8" else TOL[dtype]), f"{name}.{op}"
        else:  # the indexer's picks
            assert torch.equal(ours.sort(dim=-1).values, ref.sort(dim=-1).values), f"{name}.{op}"


def test_select_auto_and_errors():
    assert ops.select("auto", CPU, torch.float32).name == "reference"
    if ops.why_unavailable("cpu", CPU, torch.bfloat16) is None:
        assert ops.select("auto", CPU, torch.bfloat16).name == "cpu"
    assert ops.select("auto", torch.device("meta"), torch.bfloat16).name == "reference"
    with pytest.raises(ops.BackendUnavailable, match="backend 'cpu' cannot run on meta .* not meta"):
        ops.select("cpu", torch.device("meta"), torch.bfloat16)
    with pytest.raises(ValueError, match="backend = 'cuda-magic' is invalid: must be 'auto' or one of reference, cpu, triton"):
        ops.select("cuda-magic", CPU, torch.float32)
    assert "linear" in ops.load("cpu").implemented() and ops.REFERENCE.implemented() == []
    if torch.cuda.is_available():
        triton_here = ops.why_unavailable("triton", torch.device("cuda"), torch.bfloat16) is None
        assert ops.select("auto", torch.device("cuda"), torch.bfloat16).name == ("triton" if triton_here else "reference")


cpu_only = pytest.mark.skipif(ops.why_unavailable("cpu", CPU, torch.bfloat16) is not None,
                              reason=f"cpu backend: {ops.why_unavailable('cpu', CPU, torch.bfloat16)}")


@cpu_only
def test_cpu_prepack_matches_reference(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    ref, fast = load_model(path, dtype=torch.bfloat16), load_model(path, dtype=torch.bfloat16)
    quantize.prepare(fast, ops.select("cpu", CPU, torch.bfloat16))
    assert fast.layers[0].attn.wq_a.weight.is_mkldnn and fast.layers[1].ffn.experts.w13[0].is_mkldnn
    for lengths in ([13, 5], [1], [1, 1, 1]):  # prefill rows, a single row (mv path), several single rows
        ctx = StepContext.prefill(lengths)
        tokens = torch.randint(2, 128, (sum(lengths),), generator=torch.Generator().manual_seed(sum(lengths)))
        with torch.no_grad():
            a = ref.logits(ref(tokens, ctx.positions, ctx)).float()
            b = fast.logits(fast(tokens, ctx.positions, ctx)).float()
        assert ((a - b).abs().mean() / a.abs().mean()).item() < 0.02  # bf16 accumulation order only


@cpu_only
@pytest.mark.parametrize("variant", ["v2_lite", "v32", "v4"])
def test_engine_backends_agree_on_greedy_tokens(variant, hf_checkpoint):
    path, _ = hf_checkpoint(variant)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for backend in ("auto", "reference"):
        engine = engine_for(path, dtype="bfloat16", backend=backend)
        rid = engine.add_request([5, 9, 17, 33, 2, 71], params)
        while engine.has_unfinished():
            for o in engine.step():
                outs[backend] = o.outputs[0].token_ids
        assert rid
    same = sum(a == b for a, b in zip(outs["auto"], outs["reference"]))
    assert same >= 6  # bf16 rounding may flip a late near-tie, not the run


def test_expert_loop_equals_the_grouped_matmul():
    """The per-expert loop (the CPU backend's, and the reference's off the CPU for dtypes other than bf16)."""
    from moela.ops.reference import expert_loop, linear, moe

    for args, _ in op_inputs("moe", torch.float32):
        assert rel_err(expert_loop(*args[:5], linear, *args[5:]), moe(*args)) < 1e-6


def padded_step(ctx: StepContext) -> tuple[list[int], Callable, StepContext, Callable]:
    """The packed step ctx as moela/ops/export.py runs it: (the padded rows of the packed ones, pad: packed
    rows -> padded, the padded context, stored: a cache with the step's new rows written at their slots)."""
    S = max(ctx.q_lens)
    real = [b * S + j for b, n in enumerate(ctx.q_lens) for j in range(n)]
    pad = lambda t: t.new_zeros(len(ctx.q_lens) * S, *t.shape[1:]).index_copy_(0, torch.tensor(real), t)  # noqa: E731
    positions = torch.tensor([[kv - n + j for j in range(S)] for n, kv in zip(ctx.q_lens, ctx.kv_lens)])
    slots = torch.tensor([int(ctx.block_tables[b, p // 4]) * 4 + p % 4 for b, (n, kv) in enumerate(zip(ctx.q_lens, ctx.kv_lens))
                          for p in range(kv - n, kv)])

    def stored(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = cache.clone()
        ops.REFERENCE.store_latent(out, slots, rows)
        return out

    return real, pad, StepContext.padded(positions, ctx.block_tables, 4), stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_ops_match_the_reference(dtype):
    """moela/ops/export.py (export only, not an engine backend): attention on a padded step, which reads
    the cache only before each sequence's new rows, against the reference on the same step packed with
    those rows stored; the routed experts as the reference runs them."""
    from moela.ops import export

    ctx = paged_context()
    real, pad, padded, stored = padded_step(ctx)
    (q, cache, latent, *_), _ = op_inputs("latent_attention", dtype)[0]
    ref = run_op(ops.REFERENCE, "latent_attention", (q, stored(cache, latent), latent, ctx, 0.2, 16))
    ours = export.latent_attention(pad(q), cache, pad(latent), padded, 0.2, 16)
    assert ours.dtype == ref.dtype and rel_err(ours[real], ref) < TOL[dtype]
    for args, _ in op_inputs("moe", dtype):  # with and without V4's clamped SwiGLU
        assert rel_err(export.moe(*args[:3], *export.pack_experts(*args[3:5]), *args[5:]), ops.REFERENCE.moe(*args)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_indexer_and_sparse_attention_match_the_reference(dtype):
    """V3.2's ops in moela/ops/export.py pick the reference's keys (as sets: their picks index the step's
    rows, cached then new, where the reference's are positions), and attend them as it does."""
    from moela.ops import export

    ctx = paged_context()
    real, pad, padded, stored = padded_step(ctx)
    (q, weights, cache, keys, _, _, scale), _ = op_inputs("indexer_topk", dtype)[0]
    t = ctx.block_tables.shape[1] * 4  # cached rows ahead of the new ones in each sequence's step rows
    starts = padded.positions.view(len(ctx.q_lens), -1)[:, 0].repeat_interleave(max(ctx.q_lens))  # [B*S]
    for topk in (3, 8):  # 8: some queries see fewer keys
        ref = run_op(ops.REFERENCE, "indexer_topk", (q, weights, stored(cache, keys), keys, ctx, topk, scale))
        picks = export.indexer_topk(pad(q), pad(weights), cache, pad(keys), padded, topk, scale)
        as_positions = torch.where(picks < t, picks, picks - t + starts[:, None]).masked_fill(picks < 0, -1)
        assert [sorted(row) for row in as_positions[real].tolist()] == [sorted(row) for row in ref.tolist()]
    assert (ref < 0).any() and (ref >= 0).sum(1).max() == topk  # short rows and full ones

    latent_cache, latent = randn(10, 4, 20, dtype=dtype, seed=5), randn(6, 20, dtype=dtype, seed=6)
    q = randn(6, 3, 20, dtype=dtype, seed=7)
    want = run_op(ops.REFERENCE, "sparse_latent_attention", (q, stored(latent_cache, latent), latent, ref, ctx, 0.2, 16))
    ours = export.sparse_latent_attention(pad(q), latent_cache, pad(latent), picks, padded, 0.2, 16)
    assert ours.dtype == want.dtype and rel_err(ours[real], want) < TOL[dtype]


def npu_unavailable() -> str | None:
    try:
        ops.load_device("npu")  # torch_npu registers the device type
    except ops.BackendUnavailable as e:
        return str(e)
    return ops.why_unavailable("npu", torch.device("npu"), torch.bfloat16)


@pytest.mark.skipif(npu_unavailable() is not None, reason=f"npu backend: {npu_unavailable()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_npu_ops_on_an_npu_match_the_reference_on_the_cpu(dtype):
    """The ops test above runs on the CPU, where the npu backend skips; this one runs where an NPU is."""
    npu = ops.select("npu", torch.device("npu"), dtype)
    move = lambda v: v.to("npu") if isinstance(v, torch.Tensor) else v  # noqa: E731
    for op in ("rms_norm", "rope", "moe"):
        for args, _ in op_inputs(op, dtype):
            ours, ref = run_op(npu, op, tuple(move(a) for a in args)).cpu(), run_op(ops.REFERENCE, op, args)
            assert ours.dtype == ref.dtype and rel_err(ours, ref) < TOL[dtype], op


# ---- weight-only quantization: codes against the float weight, every backend against the reference ----

FORMATS = tuple(ops.reference.QUANT_FORMATS)
# Bounds on Gaussian weights (relative Frobenius error of the dequantized weight and of x W^T): round to
# nearest of 255 levels over a row's [-max, max] (int8), of 16 levels over a group's [min, max] (int4).
QUANT_ERR = {"int8": 0.01, "int4-g32": 0.09, "int4-g64": 0.10, "int4-g128": 0.11}


def fro(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_weight_rounds_to_nearest(fmt):
    from moela.ops.reference import quantize_weight, weight_format

    w = randn(64, 256, dtype=torch.float32)
    q = quantize_weight(w, weight_format(w.shape, fmt))
    step = q.scales[:, None] if q.group_size is None else q.scales.repeat_interleave(q.group_size, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 * 1.0001).all()  # every value within half a step
    assert fro(q.dequantize(), w) < QUANT_ERR[fmt]


def test_weight_format_falls_back_where_int4_does_not_fit():
    from moela.ops.reference import weight_format

    assert weight_format((64, 192), "int4-g128") == "int4-g64"  # the largest group that divides 192
    assert weight_format((64, 96), "int4-g64") == "int4-g32"
    assert weight_format((64, 80), "int4-g32") == "int8"  # no group divides 80
    assert weight_format((40, 256), "int4-g32") == "int8"  # int4 rows come in blocks of 16
    assert weight_format((64, 256), "int4-g32") == "int4-g32" and weight_format((8, 8), "int8") == "int8"


def quantized_backends() -> list:
    """Backends that quantize and run bf16 on the CPU here (quantized weights take bf16 activations)."""
    def why_not(name: str) -> str | None:
        return ops.why_unavailable(name, CPU, torch.bfloat16) or (None if ops.quantizes(ops.load(name)) else "no quantized kernels")

    return [pytest.param(name, marks=pytest.mark.skipif(why_not(name) is not None, reason=f"{name}: {why_not(name)}"))
            for name in ops.BACKENDS]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", quantized_backends())
def test_quantized_linear_matches_reference(name, fmt):
    """Same codes as the reference, so only bf16 accumulation differs; against the float weight, the
    quantization error bound. Rows cover the int kernels (1, 5) and the dequantized GEMM (300); shapes
    cover int4 in whole 64-row blocks (what the GEMM path unpacks), each int4 fallback and
    an input width torch's int8 kernel cannot take (40); inputs are views (as chunk gives)."""
    backend = ops.load(name)
    for rows in (1, 5, 300):
        for out, inp in ((128, 256), (80, 192), (40, 96), (32, 40)):
            x, w = randn(rows, 2 * inp, dtype=torch.bfloat16)[:, inp:], randn(out, inp, dtype=torch.bfloat16, seed=1) / 10
            ours = backend.linear(x, backend.pack_linear(w, fmt))
            ref = ops.REFERENCE.linear(x, ops.REFERENCE.pack_linear(w, fmt))
            assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out)
            assert fro(ours, ref) < 1e-2, f"{name} {fmt} {rows}x{inp}->{out}"
            assert fro(ours, F.linear(x.float(), w.float())) < QUANT_ERR[fmt] + 1e-2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", quantized_backends())
def test_quantized_moe_matches_reference(name, fmt):
    backend = ops.load(name)
    x, weights, indices, w13, w2 = op_inputs("moe", torch.bfloat16)[0][0]
    w13, w2 = torch.cat([w13, w13], dim=2), torch.cat([w2, w2], dim=1)  # d = 64, inter = 16: int4 fits
    x = torch.cat([x, x], dim=1)
    ours = backend.moe(x, weights, indices, *backend.pack_experts(w13, w2, fmt))
    ref = ops.REFERENCE.moe(x, weights, indices, *ops.REFERENCE.pack_experts(w13, w2, fmt))
    assert fro(ours, ref) < 1e-2
    assert fro(ours, ops.REFERENCE.moe(x, weights, indices, w13, w2)) < 2 * QUANT_ERR[fmt]  # two quantized matmuls


@cpu_only
def test_cpu_packs_large_weights_in_row_blocks(monkeypatch):
    """Packing a block of rows at a time gives the same layout as packing the whole weight at once."""
    from moela.ops import cpu

    w = randn(448, 128, dtype=torch.bfloat16)
    for fmt in ("int8", "int4-g32"):
        whole = cpu.pack_linear(w, fmt)
        monkeypatch.setattr(cpu, "PACK_VALUES", 64 * 128)
        blocks = cpu.pack_linear(w, fmt)
        monkeypatch.undo()
        for a, b in zip(vars(whole).values(), vars(blocks).values()):
            assert a == b if isinstance(a, int) else torch.equal(a, b)
