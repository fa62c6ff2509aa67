"""The triton backend beyond test_ops.py's shared cases: key slices and odd block sizes in the paged MLA
kernel, long prompts in the prefill kernel, the expert sort, both FP8 GEMM paths (FP8 dots, and FP8 weights
converted in the GEMM) against their emulation, FP8 checkpoints through the loader, and the whole engine's
greedy tokens against the reference. On a CUDA GPU where there is one; else every kernel runs in Triton's
interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1), at tiny shapes: the interpreter is slow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_hf, engine_for, quantize_checkpoint, quantize_fp8, rel_err
from moela import ops, quantize
from moela.engine.sampler import SamplingParams
from moela.loader import load_model
from moela.models import StepContext
from moela.ops import reference

ROOT = Path(__file__).parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
reason = ops.why_unavailable("triton", DEVICE, torch.float32)
pytestmark = pytest.mark.skipif(reason is not None, reason=f"triton backend: {reason}")
if reason is None:
    from moela.ops import triton as tt


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("block_size", [3, 5])
def test_paged_latent_attention_in_slices(block_size):
    """Decodes of 1-23 keys and a 4-token chunk after a cached prefix, blocks scattered through the cache."""
    q_lens, kv_lens = [1, 4, 1, 1], [23, 11, 1, 9]
    width = -(-max(kv_lens) // block_size)
    tables = torch.randperm(40, generator=torch.Generator().manual_seed(1))[: 4 * width].view(4, width).to(DEVICE)
    positions = torch.cat([torch.arange(kv - q, kv) for q, kv in zip(q_lens, kv_lens)]).to(DEVICE)
    ctx = StepContext(positions=positions, q_lens=q_lens, kv_lens=kv_lens, block_tables=tables, block_size=block_size)
    q, cache = randn(7, 3, 20, dtype=torch.bfloat16), randn(40, block_size, 20, seed=2, dtype=torch.bfloat16)
    reference.plan(ctx)
    want = reference.latent_attention(q, cache, None, ctx, 0.3, 16)
    tokens = tt._token_plan(ctx, DEVICE)
    for splits in (1, 2, 8):  # 8 slices: some are empty for the short contexts
        got = tt.paged_latent_attention(q, cache, None, tables, tokens, 0.3, 16, splits)
        assert rel_err(got, want) < 2e-2, splits


def test_latent_attention_without_cache_in_slices():
    ctx = StepContext.prefill([5, 2], DEVICE)
    ctx.naive_prefill = False
    q, latent = randn(7, 4, 24), randn(7, 24, seed=1)
    want = reference.latent_attention(q, None, latent, ctx, 0.2, 16)
    got = tt.paged_latent_attention(q, None, latent, None, tt._token_plan(ctx, DEVICE), 0.2, 16, 2)
    assert rel_err(got, want) < 1e-5


def test_causal_attention_past_one_tile():
    """70 queries (two 64-row tiles), head dims 24/12, q/k/v as the model passes them: transposed views."""
    q, k, v = (randn(70, 2, d, seed=s).transpose(0, 1) for s, d in ((0, 24), (1, 24), (2, 12)))
    assert rel_err(tt.causal_attention(q, k, v, 0.25), reference.causal_attention(q, k, v, 0.25)) < 1e-5


def test_sort_by_expert():
    indices = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 0]], device=DEVICE)
    pairs, block_expert = tt.sort_by_expert(indices, num_experts=6, block_m=2)
    n = indices.numel()
    assert block_expert.tolist() == [0, 0, 1, 2, 3, 3, -1, -1, -1, -1, -1]  # expert 0: 3 pairs -> 2 blocks
    assert len(pairs) == 2 * len(block_expert)
    for b, e in enumerate(block_expert.tolist()):
        rows = [p for p in pairs[2 * b : 2 * b + 2].tolist() if p < n]
        assert all(indices.flatten()[p] == e for p in rows) and (rows or e == -1)
    assert sorted(p for p in pairs.tolist() if p < n) == list(range(n))


@pytest.mark.parametrize("fp8_dots", [True, False], ids=["fp8-dots", "converted"])
def test_fp8_linear_equals_its_emulation(fp8_dots):
    w, x = randn(80, 96).cpu() / 10, randn(5, 96, seed=1, dtype=torch.bfloat16)
    qw, scale = (t.to(DEVICE) for t in quantize_fp8(w, (32, 32)))
    packed = tt.pack_fp8(qw, scale, (32, 32), torch.bfloat16)
    dense = reference.pack_fp8(qw, scale, (32, 32), torch.float32)
    xe = reference.pack_fp8(*tt.quantize_activations(x, 32), (1, 32), torch.float32) if fp8_dots else x.float()
    assert rel_err(tt.fp8_linear(x, packed, fp8_dots), xe @ dense.T) < 1e-2  # bf16 output rounding only
    qw, scale = quantize_fp8(w, (24, 24))
    assert isinstance(tt.pack_fp8(qw, scale, (24, 24), torch.bfloat16), torch.Tensor)  # not a power of two: dequantized


@pytest.mark.parametrize("fp8_dots", [True, False], ids=["fp8-dots", "converted"])
def test_fused_moe_with_fp8_experts(fp8_dots):
    T, E, k, d, inter, block = 6, 4, 2, 32, 48, (16, 16)
    weights, indices = randn(T, E, seed=3).softmax(-1).topk(k, dim=-1)
    x = randn(T, d, seed=4)
    w13, w2 = [torch.stack([quantize_fp8(randn(*shape, seed=10 * e + i).cpu() / 4, block)[0] for e in range(E)]).to(DEVICE)
               for i, shape in enumerate(((2 * inter, d), (d, inter)))]
    s13, s2 = randn(E, 6, 2, seed=7).abs() / 500 + 1e-3, randn(E, 2, 3, seed=8).abs() / 500 + 1e-3
    dense = [reference.pack_fp8(w, s, block, torch.float32) for w, s in ((w13, s13), (w2, s2))]
    got = tt.fused_moe(x, weights, indices, tt.pack_fp8(w13, s13, block, x.dtype), tt.pack_fp8(w2, s2, block, x.dtype), fp8_dots)
    assert rel_err(got, reference.moe(x, weights, indices, *dense)) < (0.05 if fp8_dots else 1e-5)


def fp8_model(path, backend: str, keep_fp8: bool):
    model = load_model(path, dtype=torch.float32, device=DEVICE, keep_fp8=keep_fp8)
    quantize.prepare(model, ops.select(backend, DEVICE, torch.float32))
    return model


def test_fp8_checkpoint_keeps_fp8_weights(tmp_path, monkeypatch):
    """Kept: projections, experts and fused gate/up halves (32 rows, two 16-row blocks); wkv_b comes back dense.
    With FP8 weights converted in the GEMM the logits are the dequantized checkpoint's; with FP8 dots the
    activations' e4m3 rounding moves them a few percent (and may flip a near-tie route), not the greedy tokens."""
    build_hf("v3", seed=5, num_hidden_layers=2, moe_intermediate_size=32, intermediate_size=64).save_pretrained(tmp_path)
    quantize_checkpoint(tmp_path, (16, 16))
    ref, ours = fp8_model(tmp_path, "reference", False), fp8_model(tmp_path, "triton", True)
    attn, moe = ours.layers[1].attn, ours.layers[1].ffn
    assert all(isinstance(w, tt.Fp8Weight) for w in (attn.wq_b.weight, attn.wo.weight, moe.experts.w13, moe.experts.w2,
                                                    moe.shared_experts.w13.weight, ours.layers[0].ffn.w13.weight))
    assert attn.wkv_b.weight.dtype == torch.float32 and not hasattr(attn.wkv_b, "weight_scale_inv")
    ctx = StepContext.prefill([5], DEVICE)
    tokens = torch.randint(2, 128, (5,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = lambda m: m.logits(m(tokens, ctx.positions, ctx))  # noqa: E731
    with torch.no_grad():
        want = logits(ref)
        monkeypatch.setattr(tt, "_fp8_dots", lambda device: False)
        assert rel_err(logits(ours), want) < 1e-5
        monkeypatch.setattr(tt, "_fp8_dots", lambda device: True)
        got = logits(ours)
    assert torch.equal(got.argmax(-1), want.argmax(-1)) and ((got - want).abs().mean() / want.abs().mean()) < 0.1


@pytest.mark.parametrize("variant", ["v2_lite", "v32", "v4"])
def test_engine_greedy_tokens_equal_the_reference(hf_checkpoint, variant):
    """fp32 (Triton's interpreter truncates bf16): a decode, a prompt chunked in two (its second chunk reads
    the cache) and a prompt whose first block comes from the prefix cache, sharing steps. V3.2's indexer and
    sparse attention and V4's sink attention are the reference's; the rest of their steps are this backend's."""
    path, _ = hf_checkpoint(variant)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [[5, 9, 17, 33, 2, 71, 4, 8], [5, 9, 17, 33, 40, 41], [7] * 11]
    outs = {}
    for backend in ("triton", "reference"):
        engine = engine_for(path, device=str(DEVICE), backend=backend, block_size=4, max_num_batched_tokens=8)
        assert engine.backend.name == backend
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        outs[backend] = [done[i] for i in ids]
        assert engine.scheduler.prefix_hits > 0 or not engine.blocks.prefix_caching  # V4 keeps per-sequence state
    assert outs["triton"] == outs["reference"]


def test_every_kernel_compiles_for_h100_and_mi300(tmp_path):
    """The interpreter runs what a GPU compiler might refuse: compile every kernel ahead of time for NVIDIA
    sm_90 and AMD gfx942, with the block sizes DeepSeek-V3's dims get (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "bench/compile_kernels.py"), "--targets", "cuda:90", "hip:gfx942",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    (result,) = tmp_path.glob("compile-kernels-v3-*.json")
    cuda = json.loads(result.read_text())["results"]["cuda:90"]
    assert len(cuda) == 14 and all("registers" in r for r in cuda.values())
