"""`moela export onnx` and runtime "onnx": the tiny V2, V3, V3.2 and V4 models exported (once per session),
then run by ONNX Runtime's CPU provider inside moela's engine against the PyTorch engine: fp32 logits
within 1e-4 on mixed steps, the same greedy tokens with chunked prefill, prefix caching and preemption,
prompt logprobs, the provider fallback, `moela generate` and `moela serve` on the export."""

import json
import logging
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxscript", reason="moela export onnx needs the onnx extra")
pytest.importorskip("onnxruntime", reason="runtime 'onnx' needs the onnx extra")

from conftest import Stepper, engine_for  # noqa: E402
from moela import SamplingParams, cli  # noqa: E402
from moela.engine.config import EngineConfig  # noqa: E402
from moela.engine.cache import BlockManager, CacheLayout  # noqa: E402
from moela.engine.onnx_runner import OnnxRunner, pad_groups, read_manifest  # noqa: E402
from moela.engine.sequence import Sequence  # noqa: E402
from moela.export import main as export_main  # noqa: E402
from moela.loader import load_model  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="session")
def exported(hf_checkpoint, text_model, tmp_path_factory):
    """variant -> (checkpoint directory, export directory); V3 is the one with a tokenizer, exported through the CLI."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in cache:
            src = text_model if variant == "v3" else hf_checkpoint(variant)[0]
            out = tmp_path_factory.mktemp(f"{variant}-onnx")
            if variant == "v3":
                assert export_main(["onnx", str(src), str(out)]) == 0
            else:
                from moela.export import export_onnx

                export_onnx(src, out)
            cache[variant] = (src, out)
        return cache[variant]

    return get


def prompts(n: int, seed: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 128) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


class OnnxStepper(Stepper):
    """conftest's Stepper with the ONNX runner in place of the PyTorch one."""

    def __init__(self, path: Path, n_seqs: int, num_blocks: int = 64, block_size: int = 4):
        specs, dtype = read_manifest(path)
        layout = CacheLayout.fit(specs, dtype, block_size)
        slots = n_seqs if layout.fixed_bytes_per_sequence else 0  # V4's window and compressor state
        self.blocks = BlockManager(num_blocks, layout.block_size, enable_prefix_caching=False, num_slots=slots)
        self.runner = OnnxRunner(path, layout, num_blocks, num_slots=slots)
        self.seqs = [Sequence(str(i), 0, [], 0, SamplingParams(), None, None) for i in range(n_seqs)]


# new tokens per sequence and step: prompts of different lengths (one prefill group, padded), chunks beside
# decodes (in the prefill graph), decodes, more chunks; 47, 32 and 22 tokens in all, past V4's window of
# 8 and several of its compressors' windows (4 and 8 tokens), and V3.2's top-6
STEPS = ([13, 5, 2], [3, 11, 1], [1, 1, 1], [6, 1, 9], [1, 1, 1], [1, 1, 1], [17, 9, 4], [1, 1, 1], [1, 1, 1], [3, 1, 1])


@pytest.mark.parametrize("variant", ["v2", "v3", "v32", "v4"])
def test_logits_match_the_torch_runner_on_mixed_steps(exported, variant):
    src, out = exported(variant)
    torch_steps, onnx_steps = Stepper(load_model(src, torch.float32), 3), OnnxStepper(out, 3)
    rng = random.Random(0)
    for lengths in STEPS:
        new = [[rng.randrange(2, 128) for _ in range(n)] for n in lengths]
        a, b = torch_steps.step([list(t) for t in new]), onnx_steps.step([list(t) for t in new])
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["v2", "v3", "v32", "v4"])
def test_greedy_tokens_equal_the_torch_engine(exported, variant):
    src, out = exported(variant)
    ps = prompts(6, seed=1)
    system = prompts(1, seed=2, lo=20, hi=21)[0]
    ps += [system + tail for tail in prompts(3, seed=3, lo=2, hi=6)]  # shared prefix: cached blocks
    outs = {}
    layout = engine_for(src).layout
    for runtime, path in (("torch", src), ("onnx", out)):  # 160 tokens' blocks (V4: 8 sequences' state too): preemption
        engine = engine_for(path, runtime=runtime, skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=24,
                            max_num_seqs=8, kv_cache_memory=layout.bytes_per_token * 160 + 8 * layout.fixed_bytes_per_sequence)
        ids = [engine.add_request(p, GREEDY) for p in ps]
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs[runtime] = [done[i].outputs[0].token_ids for i in ids]
        assert engine.blocks.num_free == engine.blocks.num_blocks and engine.scheduler.num_preemptions > 0
    assert outs["onnx"] == outs["torch"]


def test_float16_graphs_run_on_the_cpu_provider(hf_checkpoint, tmp_path):
    """float16 graphs (ONNX Runtime's CPU ScatterND has no float16 add: the experts' outputs are summed in fp32)
    pick the fp32 PyTorch runner's tokens."""
    src = hf_checkpoint("v2")[0]
    assert export_main(["onnx", str(src), str(tmp_path), "--dtype", "float16"]) == 0
    torch_steps, onnx_steps = Stepper(load_model(src, torch.float32), 3), OnnxStepper(tmp_path, 3)
    rng = random.Random(1)
    for lengths in STEPS[:3]:
        new = [[rng.randrange(2, 128) for _ in range(n)] for n in lengths]
        a, b = torch_steps.step([list(t) for t in new]), onnx_steps.step([list(t) for t in new])
        assert (a - b).abs().max().item() < 0.1 and torch.equal(a.argmax(-1), b.argmax(-1))


def test_prompt_logprobs_through_the_prefill_graph(exported):
    src, out = exported("v2")
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    got = {}
    for runtime, path in (("torch", src), ("onnx", out)):
        engine = engine_for(path, runtime=runtime, skip_tokenizer_init=True)
        engine.add_request([5, 9, 17, 33, 2, 71], params)
        engine.add_request([8, 4], GREEDY)  # in the same prefill group, without prompt logprobs
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished and o.prompt_logprobs:
                    got[runtime] = o.prompt_logprobs
    for a, b in zip(got["torch"][1:], got["onnx"][1:]):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_manifest_weights_and_tokenizer(exported):
    src, out = exported("v3")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["opset"] >= 20 and len(manifest["caches"]) == 3
    assert manifest["graphs"]["decode"]["inputs"][:3] == ["tokens", "positions", "block_tables"]
    assert manifest["graphs"]["prefill"]["outputs"] == ["logits", "kv_cache.0.new", "kv_cache.1.new", "kv_cache.2.new"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "prefill.onnx", "decode.onnx"):
        assert (out / name).is_file()
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert (out / "weights.data").stat().st_size < 1.5 * weights  # both graphs share one copy (fp32 = the checkpoint)
    import onnx

    for graph in ("prefill", "decode"):
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert big and all(entry.value == "weights.data" for t in big for entry in t.external_data if entry.key == "location")


def test_v4_graphs_take_the_sequences_slots_and_return_their_state(exported):
    _, out = exported("v4")
    manifest = json.loads((out / "manifest.json").read_text())
    prefill, decode = manifest["graphs"]["prefill"], manifest["graphs"]["decode"]
    assert prefill["inputs"][:6] == ["tokens", "positions", "block_tables", "logit_rows", "seq_slots", "lengths"]
    assert decode["inputs"][:4] == ["tokens", "positions", "block_tables", "seq_slots"]
    assert manifest["caches"][2] == [  # the HCA layer: its window ring, its compressor's entries and pending rows
        {"name": "window_cache", "kind": "window", "width": 32, "tokens_per_entry": 1, "entries_per_sequence": 8},
        {"name": "compressor.entries", "kind": "hca", "width": 32, "tokens_per_entry": 8, "entries_per_sequence": 0},
        {"name": "compressor.pending", "kind": "hca pending", "width": 64, "tokens_per_entry": 1, "entries_per_sequence": 7}]
    assert decode["outputs"][1:4] == ["window_cache.0.new", "window_cache.1.new", "compressor.entries.1.new"]


def test_missing_provider_falls_back_to_the_cpu_with_one_warning(exported, caplog):
    _, out = exported("v2")
    with caplog.at_level(logging.WARNING, logger="moela"):
        engine = engine_for(out, runtime="onnx", provider="cann", skip_tokenizer_init=True)
    fallbacks = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallbacks) == 1 and "CANNExecutionProvider" in fallbacks[0] and "CPUExecutionProvider" in fallbacks[0]
    assert engine.runner.provider == "CPUExecutionProvider"
    engine.add_request([5, 6, 7], GREEDY)
    while engine.has_unfinished():
        engine.step()


def test_runtime_onnx_refuses_a_directory_that_is_no_export(hf_checkpoint):
    src, _ = hf_checkpoint("v2")
    with pytest.raises(ValueError, match="no manifest.json .* written by `moela export onnx`"):
        engine_for(src, runtime="onnx")
    with pytest.raises(ValueError, match="provider = 'cuda' applies to runtime 'onnx' only"):
        engine_for(src, provider="cuda")
    with pytest.raises(ValueError, match="speculative_config applies to runtime 'torch' only"):
        EngineConfig(model="x", runtime="onnx", speculative_config={"method": "mtp"})
    with pytest.raises(ValueError, match="tensor_parallel_size applies to runtime 'torch' only"):
        EngineConfig(model="x", runtime="onnx", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="cuda_graphs applies to runtime 'torch' only"):
        engine_for(src, runtime="onnx", cuda_graphs=True)
    with pytest.raises(ValueError, match="quantization = 'int8' applies to runtime 'torch' only"):
        engine_for(src, runtime="onnx", quantization="int8")


def test_generate_and_serve_on_the_export(exported, capsys):
    src, out = exported("v3")
    args = ["generate", "--temperature", "0", "--max-tokens", "6", "--dtype", "float32", "--threads", "1", "def fib"]
    texts = {}
    for runtime, path in (("torch", src), ("onnx", out)):
        assert cli.main(args[:1] + ["--model", str(path), "--runtime", runtime] + args[1:]) == 0
        texts[runtime] = capsys.readouterr().out
    assert texts["onnx"] == texts["torch"]

    from test_server import ThreadServer

    server = ThreadServer(out, runtime="onnx").start()
    try:
        body = {"model": "tiny", "prompt": "def fib", "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1}
        reply = server.post("/v1/completions", body).json()
        assert reply["choices"][0]["text"].startswith("def fib") and len(reply["choices"][0]["logprobs"]["tokens"]) > 3
    finally:
        server.stop()


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert export_main(["onnx", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "no such model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["onnx", str(tmp_path), str(tmp_path / "out"), "--dtype", "bfloat16"])


def test_pad_groups_keeps_padding_under_twice_the_rows():
    assert pad_groups({0: 5, 1: 4, 2: 5}) == [[0, 2, 1]]
    assert pad_groups({0: 1, 1: 40, 2: 3, 3: 30}) == [[1, 3, 2], [0]]  # 4 x 40 rows would pad 74 to 160
    for lengths in ({i: random.Random(i).randrange(1, 50) for i in range(9)},):
        groups = pad_groups(lengths)
        assert sorted(b for g in groups for b in g) == sorted(lengths)
        assert all(len(g) * max(lengths[b] for b in g) <= 2 * sum(lengths[b] for b in g) for g in groups)
