"""Decode graphs (engine/graphs.py) on the CPU, through a stand-in for torch.cuda.CUDAGraph that replays by
re-running what it captured on the captured buffers and copying into the captured output: the bookkeeping
(padding to a captured size, the scratch block, copying a step into the captured buffers, the eager
fallback) is then checked against an eager runner, step by step."""

import pytest
import torch

from moela import ops, quantize
from moela.engine.config import EngineConfig
from moela.engine.cache import BlockManager, CacheLayout
from moela.engine.graphs import graph_sizes, same_layout
from moela.engine.runner import Runner
from moela.engine.sampler import SamplingParams
from moela.engine.sequence import Sequence
from moela.loader import load_model

CPU = torch.device("cpu")
BLOCK, NUM_BLOCKS, WIDTH = 4, 24, 8


class FakeGraph:
    replays = 0

    def capture(self, fn):
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self) -> None:
        FakeGraph.replays += 1
        self.out.copy_(self.fn())


def runner_for(path, backend: str, graph_sizes: list[int] | None) -> Runner:
    model = load_model(path, dtype=torch.float32)
    quantize.prepare(model, ops.select(backend, CPU, torch.float32))
    layout = CacheLayout(model.cache_specs(), torch.float32, BLOCK)
    runner = Runner(model, layout, NUM_BLOCKS + 1, backend=model.layers[0].attn.ops)  # the last block: scratch
    if graph_sizes:
        runner.capture_graphs(graph_sizes, WIDTH, scratch_block=NUM_BLOCKS, new_graph=FakeGraph)
    return runner


def drive(runners: list[Runner], prompts: list[list[int]], steps: int) -> None:
    """Greedy steps of every prompt on every runner (each with its own cache), asserting equal logits; at
    step 1 the first sequence's decode joins the others' prefills."""
    blocks = BlockManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=False)
    seqs = [Sequence(str(i), 0, list(p), len(p), SamplingParams(), None, None) for i, p in enumerate(prompts)]
    for step in range(steps):
        batch = []
        for seq in seqs if step else seqs[:1]:
            assert blocks.ensure(seq, len(seq.token_ids))
            batch.append((seq, len(seq.token_ids) - seq.num_computed))
        logits = [r.execute(batch)[0] for r in runners]
        assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5), f"step {step}"
        for (seq, n), token in zip(batch, logits[0].argmax(-1).tolist()):
            seq.num_computed += n
            seq.token_ids.append(token)


@pytest.mark.skipif(ops.why_unavailable("triton", CPU, torch.float32) is not None,
                    reason=f"triton on the CPU: {ops.why_unavailable('triton', CPU, torch.float32)}")
def test_triton_decode_steps_replay_and_match_eager(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    eager, graphed = runner_for(path, "triton", None), runner_for(path, "triton", [4])
    FakeGraph.replays = 0
    drive([eager, graphed], [[5, 9, 17, 33, 2, 71], [7, 8, 9], [3] * 5], steps=4)  # 2 prefill steps, 2 decodes of 3
    assert FakeGraph.replays == 2
    scratch = graphed.caches[0]["kv_cache"][NUM_BLOCKS]
    assert scratch.abs().sum() > 0 and eager.caches[0]["kv_cache"][NUM_BLOCKS].abs().sum() == 0  # padding wrote there


def test_eager_fallback(hf_checkpoint):
    """The reference pads keys to the longest context: captured at one block, its decodes replay while every
    context fits one block and run eagerly after; so do prefills and batches larger than every graph."""
    path, _ = hf_checkpoint("v3")
    eager, graphed = runner_for(path, "reference", None), runner_for(path, "reference", [1, 2])
    FakeGraph.replays = 0
    drive([eager, graphed], [[5, 9], [6, 2]], steps=5)  # contexts 2, 3 | 3 + 2 | 4 + 3 | 5 + 4 | 6 + 5
    assert FakeGraph.replays == 1  # the step with contexts (4, 3); the next two need two blocks
    FakeGraph.replays = 0
    drive([eager, graphed], [[5, 1], [6, 1], [7, 1]], steps=3)  # then three decodes: more than 2
    assert FakeGraph.replays == 0


def test_same_layout():
    t = torch.zeros(2, 3)
    assert same_layout({"a": (t, [1, None])}, {"a": (torch.ones(2, 3), [1, None])})
    assert not same_layout({"a": (t, [1, None])}, {"a": (torch.ones(2, 4), [1, None])})
    assert not same_layout({"a": (t, [1])}, {"a": (t, [2])}) and not same_layout({"a": t}, {"b": t})
    assert not same_layout((t,), [t]) and not same_layout(t, t.long())


def test_graph_sizes_and_config():
    assert graph_sizes(1) == [1] and graph_sizes(8) == [1, 2, 4, 8] and graph_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    with pytest.raises(ValueError, match="cuda_graphs = True needs a CUDA device, not device = 'cpu'"):
        EngineConfig(cuda_graphs=True)
