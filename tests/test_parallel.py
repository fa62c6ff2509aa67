"""Tensor and expert parallelism (moela/parallel.py, moela/engine/ranks.py): each rank reads only its slices,
the ranks' shares add up to the whole, greedy outputs on 2 and 4 gloo ranks equal one process's, and a
rank that dies makes the others fail fast instead of hanging."""

import os
import queue
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import BASE, VARIANTS, build_hf, quantize_checkpoint
from moela import LLM, SamplingParams
from moela.config import ModelConfig
from moela.engine.config import EngineConfig
from moela.engine.llm import LLMEngine
from moela.engine.ranks import follow_forever, free_port
from moela.errors import ConfigError
from moela.loader import load_model
from moela.ops import reference
from moela.parallel import Mesh, RankError, Shard, serve_pairs
from moela.placement import Placement, plan_placement

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 9, 22, 17, 3], [7, 8, 100, 4, 4, 6, 2, 9, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48, 3, 3, 9], [12, 2]]
# chunked prefill; a stalled rank fails the others in a minute, not the default ten
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, block_size=8, max_num_batched_tokens=16, distributed_timeout=60)
REPO = Path(__file__).parent.parent


def model_config(variant: str) -> ModelConfig:
    model_type, extra = VARIANTS[variant]
    return ModelConfig.from_dict({**BASE, **extra, "model_type": model_type})


def skewed_plan(n_ranks: int, redundant: int) -> Placement:
    rng = random.Random(0)
    load = {layer: [rng.randrange(10, 50) * (8 if e in (2, 5) else 1) for e in range(8)] for layer in (1, 2)}
    return plan_placement(load, 8, n_ranks, redundant)


def fused_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with its experts stacked as transformers' gate_up_proj [E, 2I, d] / down_proj [E, d, I]."""
    tensors, out = load_file(str(src / "model.safetensors")), {}
    for name, t in tensors.items():
        if ".experts." not in name:
            out[name] = t
        elif name.endswith("experts.0.gate_proj.weight"):
            p, E = name.split("experts.0.")[0], 8
            out[p + "experts.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}experts.{e}.{w}_proj.weight"]
                                                                      for w in ("gate", "up")]) for e in range(E)])
            out[p + "experts.down_proj"] = torch.stack([tensors[f"{p}experts.{e}.down_proj.weight"] for e in range(E)])
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("world,ep,plan", [(2, 1, False), (2, 2, False), (4, 2, True), (4, 4, False)])
def test_each_rank_loads_its_slices_and_reads_no_other_expert(hf_checkpoint, tmp_path, monkeypatch, world, ep, plan):
    path, _ = hf_checkpoint("v3")
    cfg = ModelConfig.from_pretrained(path)
    full = dict(load_model(path, torch.float32).named_parameters())
    placement = skewed_plan(ep, 2) if plan else None
    reads = []  # (tensor name, index read)
    original = sys.modules["moela.loader"]._read
    monkeypatch.setattr("moela.loader._read", lambda name, where, handles, c, index=(), **kw: reads.append((name, index))
                        or original(name, where, handles, c, index, **kw))
    for checkpoint in (path, fused_copy(path, tmp_path / "fused")):
        for rank in range(world):
            shard = Shard(Mesh(rank, world, ep), cfg, placement)
            reads.clear()
            part = load_model(checkpoint, torch.float32, shard=shard)
            for name, p in part.named_parameters():
                want = shard.local(name, full[name].detach())
                assert torch.equal(p, full[name] if want is None else want), (rank, name)
            for name, index in [(n, i) for n, i in reads if ".experts." in n]:
                parts = name.split(".")  # model.layers.L.mlp.experts.E.gate_proj.weight, or ...experts.gate_up_proj
                expert = int(parts[5]) if parts[5].isdigit() else index[0]  # stacked: the expert's rows alone
                assert expert in shard.slots(f"layers.{parts[2]}.ffn.experts.w13"), (rank, name, index)
    assert part.layers[0].attn.n_heads == 4 // world


@pytest.mark.parametrize("world,ep", [(2, 1), (2, 2)])
def test_fp8_weights_stay_fp8_where_a_rank_cuts_between_scale_blocks(tmp_path, world, ep):
    """16x16 blocks: w13 halves (32 and 64 rows) and w2 columns cut into 16s stay e4m3 with their scales' rows;
    wkv_b (56 rows a rank) and wo (24 columns) cut inside a block, so they are dequantized first."""
    build_hf("v3", seed=5, num_hidden_layers=2, moe_intermediate_size=32, intermediate_size=64).save_pretrained(tmp_path)
    quantize_checkpoint(tmp_path, (16, 16))
    full = dict(load_model(tmp_path, torch.float32).named_parameters())
    for rank in range(world):
        shard = Shard(Mesh(rank, world, ep), ModelConfig.from_pretrained(tmp_path))
        part = load_model(tmp_path, torch.float32, keep_fp8=True, shard=shard)
        fp8 = {n for n, p in part.named_parameters() if p.dtype == torch.float8_e4m3fn}
        assert {"layers.1.ffn.experts.w13", "layers.1.ffn.experts.w2", "layers.0.ffn.w13.weight",
                "layers.1.attn.wq_b.weight"} <= fp8 and not {"layers.1.attn.wkv_b.weight", "layers.1.attn.wo.weight"} & fp8
        for name, p in part.named_parameters():
            owner, attr = name.rsplit(".", 1)
            got = reference.pack_fp8(p, getattr(part.get_submodule(owner), attr + "_scale_inv"), (16, 16),
                                     torch.float32) if name in fp8 else p
            want = shard.local(name, full[name].detach())
            assert torch.equal(got, full[name] if want is None else want), (rank, name)


@pytest.mark.parametrize("world,ep", [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_the_ranks_shares_of_the_routed_experts_add_up_to_the_whole(world, ep):
    cfg, g = model_config("v3"), torch.Generator().manual_seed(0)
    T, d, E, k, inter = 13, cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    x, w13 = torch.randn(T, d, generator=g), torch.randn(E, 2 * inter, d, generator=g) / d**0.5
    w2 = torch.randn(E, d, inter, generator=g) / inter**0.5
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    whole = reference.moe(x, weights, indices, w13, w2)
    placement = skewed_plan(ep, ep) if ep > 1 else None
    total = torch.zeros_like(x)
    for rank in range(world):
        shard = Shard(Mesh(rank, world, ep), cfg, placement)
        name = "layers.1.ffn.experts"
        a, b = shard.local(name + ".w13", w13), shard.local(name + ".w2", w2)
        if ep == 1:
            total += reference.moe(x, weights, indices, a, b)
        else:
            total += serve_pairs(x, weights, indices, a, b, moe=reference.moe, route=shard.route(name, x.device),
                                 me=shard.mesh.ep_rank)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)


def test_bad_layouts_are_refused_with_the_reason():
    cfg = model_config("v3")
    with pytest.raises(ConfigError, match="num_attention_heads = 4 does not split evenly over 3 ranks"):
        Shard(Mesh(0, 3), cfg)
    with pytest.raises(ConfigError, match="n_routed_experts = 8 does not split evenly over 3"):
        Shard(Mesh(0, 6, 3), replace(cfg, num_attention_heads=6))
    with pytest.raises(ConfigError, match="the plan is for 8 experts on 2 ranks"):
        Shard(Mesh(0, 4, 4), cfg, skewed_plan(2, 0))
    with pytest.raises(ConfigError, match="DeepSeek-V4 runs on one rank"):
        Shard(Mesh(0, 2), ModelConfig.from_dict({**VARIANTS["v4"][1], "model_type": "deepseek_v4"}))
    with pytest.raises(ValueError, match="expert_parallel_size = 3 is invalid: must divide tensor_parallel_size = 4"):
        EngineConfig(tensor_parallel_size=4, expert_parallel_size=3)
    with pytest.raises(ValueError, match="cuda_graphs = True needs tensor_parallel_size = 1, not 2"):
        EngineConfig(device="cuda", cuda_graphs=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size = 0 is invalid"):
        EngineConfig(tensor_parallel_size=0)


def greedy(engine_or_llm, prompts=PROMPTS) -> list[list[int]]:
    llm = engine_or_llm if isinstance(engine_or_llm, LLM) else None
    if llm is None:
        llm = LLM.__new__(LLM)
        llm.engine = engine_or_llm
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _group_worker(rank: int, world: int, port: int, cases: list, results) -> None:
    """One rank of a gloo group that runs an engine per case: rank 0 generates, the others follow."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for path, kwargs in cases:
            cfg = EngineConfig(model=path, tensor_parallel_size=world, threads=1, **ENGINE, **kwargs)
            if rank:
                follow_forever(cfg)
                continue
            engine = LLMEngine(cfg)
            results.put((str(path), kwargs, greedy(engine), engine.expert_load()))
            engine.close()
    finally:
        dist.destroy_process_group()


def run_ranks(target, world: int, args: tuple, n_results: int) -> list:
    """Spawn `world` ranks running target(rank, world, port, *args, results) and collect n_results results.
    A rank that fails ends the wait at once, and ranks still running at the end are killed: nothing hangs."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out, deadline = [], time.monotonic() + 300
        while len(out) < n_results:
            try:
                out.append(results.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed and time.monotonic() < deadline, f"ranks exited with {failed}, {len(out)} results"
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * world
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def run_group(world: int, cases: list) -> list:
    return run_ranks(_group_worker, world, (cases,), len(cases))


def single_process(path: Path, **kwargs) -> tuple[list, dict]:
    engine = LLMEngine(EngineConfig(model=path, threads=1, **ENGINE, **kwargs))
    return greedy(engine), engine.expert_load()


def test_two_ranks_tp_and_ep_match_one_process_on_v2_v3_v32_fp8_and_int8(hf_checkpoint, tmp_path):
    build_hf("v3", seed=5, num_hidden_layers=2, moe_intermediate_size=32, intermediate_size=64).save_pretrained(tmp_path)
    quantize_checkpoint(tmp_path, (16, 16))  # each rank keeps its FP8 slices, then the backend dequantizes them
    cases = [(hf_checkpoint(v)[0], kw) for v in ("v3", "v2", "v32")
             for kw in ({}, {"enable_expert_parallel": True})]
    cases += [(hf_checkpoint("v2_lite")[0], {"enable_expert_parallel": True}), (tmp_path, {})]
    # int8 on load: each rank quantizes its slices; a column-split weight (wo, w2) gets its own row scales,
    # so the logits are close, not equal, to one process's; the greedy tokens of this model are equal
    cases.append((hf_checkpoint("v3")[0], {"enable_expert_parallel": True, "quantization": "int8"}))
    for path, kwargs, tokens, load in run_group(2, cases):
        want_tokens, want_load = single_process(Path(path), quantization=kwargs.get("quantization"))
        assert tokens == want_tokens, (path, kwargs)
        assert load == want_load  # rank 0 counts every token's experts, wherever they are served


def test_four_ranks_tp_x_ep_with_a_placement_plan_match_one_process(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("v3")
    skewed_plan(2, 2).save(tmp_path / "plan.json")  # 2 expert groups of 2 ranks, 5 slots each (2 redundant copies)
    cases = [(path, {"expert_parallel_size": 2, "expert_placement": str(tmp_path / "plan.json")}),
             (path, {"enable_expert_parallel": True})]
    want = single_process(path)[0]
    for _, kwargs, tokens, _ in run_group(4, cases):
        assert tokens == want, kwargs


def test_llm_starts_its_ranks_and_a_dead_rank_fails_rank_zero_at_once(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    llm = LLM(model=path, tensor_parallel_size=2, enable_expert_parallel=True, threads=1, **ENGINE)
    try:
        assert greedy(llm) == single_process(path)[0]
        follower = llm.engine.ranks.procs[0]
        os.kill(follower.pid, signal.SIGKILL)
        follower.join(10)
        start = time.perf_counter()
        with pytest.raises(RankError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate([[5, 6, 7]], GREEDY)
        assert time.perf_counter() - start < 10
    finally:
        llm.engine.close()


def test_followers_exit_with_a_clear_error_when_rank_zero_dies(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("v3")
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys\nfrom moela import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(path)!r}, tensor_parallel_size=2, threads=1, dtype='float32', skip_tokenizer_init=True)\n"
        "    llm.generate([[5, 6]], SamplingParams(max_tokens=2))\n"
        "    print(llm.engine.ranks.procs[0].pid, flush=True)\n"
        "    os._exit(3)\n")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stderr[-2000:]
    follower = Path(f"/proc/{proc.stdout.split()[-1]}/status")  # run() returned: the follower closed its stderr
    assert not follower.exists() or "zombie" in follower.read_text()
    assert "lost contact with the other ranks" in proc.stderr and "exiting" in proc.stderr


def test_generate_command_starts_its_ranks_and_prints_what_one_process_does(text_model, capsys):
    from moela.cli import main

    argv = ["generate", "--model", str(text_model), "--temperature", "0", "--max-tokens", "8", "--dtype", "float32",
            "--threads", "1", "def fibonacci(n):"]
    assert main(argv) == 0
    single = capsys.readouterr().out
    assert main(argv + ["--tensor-parallel-size", "2", "--enable-expert-parallel"]) == 0
    assert capsys.readouterr().out == single and not dist.is_initialized()
