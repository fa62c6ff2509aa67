"""LLMEngine and LLM: continuous batching, prefix caching, preemption, aborts, sampling, outputs."""

import random

import pytest
import torch

from conftest import engine_for
from moela import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40, vocab: int = 128) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def run(engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict[str, object]:
    """Add requests at the given step numbers; step until everything finished; final outputs by id."""
    done, order, step = {}, [], 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, params in arrivals.get(step, []):
            order.append(engine.add_request(prompt, params))
        done.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
    return [done[r] for r in order]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_mixed_batch_arriving_at_different_steps_matches_transformers(hf_checkpoint):
    path, hf = hf_checkpoint("v3")
    engine = engine_for(path, max_num_batched_tokens=48, block_size=8)  # chunked prefill for the long prompts
    ps = prompts(8, seed=1)
    outs = run(engine, {0: [(p, GREEDY) for p in ps[:3]], 2: [(ps[3], GREEDY)], 5: [(p, GREEDY) for p in ps[4:7]], 9: [(ps[7], GREEDY)]})
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 24) and out.outputs[0].finish_reason == "length"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_caching_on_and_off_give_identical_outputs(hf_checkpoint):
    path, _ = hf_checkpoint("v2")
    system = prompts(1, seed=2, lo=40, hi=41)[0]
    ps = [system + tail for tail in prompts(5, seed=3, lo=2, hi=9)]
    results = {}
    for caching in (True, False):
        engine = engine_for(path, block_size=8, enable_prefix_caching=caching)
        first = run(engine, {0: [(ps[0], GREEDY)]})
        rest = run(engine, {0: [(p, GREEDY) for p in ps[1:]]})
        results[caching] = [o.outputs[0].token_ids for o in first + rest]
        cached = [o.num_cached_tokens for o in rest]
        assert cached == ([40] * 4 if caching else [0] * 4)  # the 40-token system prompt = 5 full blocks
    assert results[True] == results[False]


def test_small_cache_forces_preemption_and_outputs_stay_identical(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    ps = prompts(6, seed=4, lo=10, hi=20)
    big = engine_for(path, block_size=4)
    ref = [o.outputs[0].token_ids for o in run(big, {0: [(p, GREEDY) for p in ps]})]
    per_token = big.bytes_per_token
    small = engine_for(path, block_size=4, kv_cache_memory=per_token * 4 * 24, enable_prefix_caching=False)  # 96 tokens
    outs = run(small, {0: [(p, GREEDY) for p in ps]})
    assert small.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert small.blocks.num_free == small.blocks.num_blocks


def test_request_that_can_never_fit_is_rejected_with_both_numbers(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    engine = engine_for(path, block_size=4, kv_cache_memory=engine_for(path).bytes_per_token * 64)
    with pytest.raises(ValueError, match="needs 100 cached tokens .* holds 64"):
        engine.add_request(list(range(2, 52)), SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match=r"prompt \(250 tokens\) \+ max_tokens \(10\) = 260 exceeds max_model_len = 256"):
        engine.add_request([5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"prompt token id 128 is outside the vocabulary \[0, 128\)"):
        engine.add_request([5, 128], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], SamplingParams())


def test_abort_returns_every_block(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    engine = engine_for(path, block_size=4)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in prompts(4, seed=5)]  # none ends before the abort
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    for rid in ids:
        assert engine.abort(rid)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished() and not engine.abort(ids[0])


def test_no_block_leak_after_200_random_requests_with_random_aborts(hf_checkpoint):
    path, _ = hf_checkpoint("v2_lite")
    engine = engine_for(path, block_size=4, kv_cache_memory=engine_for(path).bytes_per_token * 160, max_num_seqs=16)
    rng = random.Random(6)
    live = []
    for i, p in enumerate(prompts(200, seed=7, lo=1, hi=12)):
        live.append(engine.add_request(p, SamplingParams(temperature=rng.choice([0, 1]), max_tokens=rng.randrange(1, 6), n=rng.choice([1, 1, 2]))))
        if rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        if i % 3 == 0:
            finished = {o.request_id for o in engine.step() if o.finished}
            live = [r for r in live if r not in finished]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks and all(r == 0 for r in engine.blocks.ref)


def test_seeded_sampling_reproducible_across_batch_compositions(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    target = prompts(1, seed=8)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = run(engine_for(path), {0: [(target, params)]})[0].outputs[0].token_ids
    crowd = [(p, SamplingParams(temperature=1.0, max_tokens=20)) for p in prompts(5, seed=9)]
    mixed = run(engine_for(path, max_num_batched_tokens=32), {0: crowd[:3], 1: [(target, params)], 3: crowd[3:]})
    assert mixed[3].outputs[0].token_ids == alone
    other = run(engine_for(path), {0: [(target, SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True))]})
    assert other[0].outputs[0].token_ids != alone


def test_chunked_prefill_does_not_stall_running_decodes(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    engine = engine_for(path, max_num_batched_tokens=16, block_size=8)
    short = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    engine.add_request(list(range(2, 122)), SamplingParams(max_tokens=2, ignore_eos=True))  # 120 tokens = 8 chunks
    grew = []
    for _ in range(6):
        out = next(o for o in engine.step() if o.request_id == short)
        grew.append(len(out.outputs[0].delta_token_ids))
    assert grew == [1] * 6  # the decode got its token every step while the long prompt was prefilled


def test_n_samples_share_the_prompt_blocks_and_logprobs(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    engine = engine_for(path, block_size=4)
    prompt = prompts(1, seed=10, lo=20, hi=21)[0]
    out = run(engine, {0: [(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, logprobs=3, ignore_eos=True))]})[0]
    assert [c.index for c in out.outputs] == [0, 1, 2] and len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.scheduler.prefix_hits >= 2 * 16  # samples 1 and 2 reused sample 0's four full prompt blocks
    for c in out.outputs:
        assert len(c.logprobs) == 8 and all(len(d) >= 3 and tok in d for d, tok in zip(c.logprobs, c.token_ids))
        assert c.cumulative_logprob == pytest.approx(sum(d[t] for d, t in zip(c.logprobs, c.token_ids)))


def test_prompt_logprobs_match_a_full_forward(hf_checkpoint):
    path, hf = hf_checkpoint("v2")
    prompt = prompts(1, seed=11, lo=30, hi=31)[0]
    out = run(engine_for(path, max_num_batched_tokens=8), {0: [(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))]})[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert out.prompt_logprobs[pos][prompt[pos]] == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)


def test_min_tokens_stop_token_ids_and_eos(hf_checkpoint):
    path, _ = hf_checkpoint("v3")
    engine = engine_for(path)
    prompt = prompts(1, seed=12)[0]
    free = run(engine, {0: [(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]})[0].outputs[0].token_ids
    stop_tok = free[4]
    out = run(engine, {0: [(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))]})[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(stop_tok) + 1]
    held = run(engine, {0: [(prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[stop_tok]))]})[0].outputs[0]
    assert len(held.token_ids) == 12 and stop_tok not in held.token_ids and held.finish_reason == "length"


def test_stop_string_spanning_tokens_cuts_the_text(text_model):
    llm = LLM(model=text_model, dtype="float32")
    free = llm.generate("def fib", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    ids = free.token_ids
    tok = llm.get_tokenizer()
    # a stop string made of the end of one token's text and the start of the next
    i = next(i for i in range(1, len(ids) - 1) if len(tok.decode(ids[i : i + 1])) >= 1 and len(tok.decode(ids[i + 1 : i + 2])) >= 1)
    before = tok.decode(ids[:i])
    stop = tok.decode(ids[: i + 2])[len(before) - 1 if before else 0 :][:2]
    out = llm.generate("def fib", SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and stop not in out.text and free.text.startswith(out.text + stop)


def test_streamed_deltas_add_up_to_the_text(text_model):
    llm = LLM(model=text_model, dtype="float32")
    engine = llm.engine
    rid = engine.add_request("for i in", SamplingParams(temperature=0.7, seed=3, max_tokens=20, stop=["zz"]))
    pieces, ids, final = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.outputs[0].delta_text)
            ids += out.outputs[0].delta_token_ids
            final = out
    assert final.request_id == rid and "".join(pieces) == final.outputs[0].text and ids == final.outputs[0].token_ids


def test_llm_generate_and_chat_api(text_model):
    llm = LLM(model=text_model, dtype="float32", max_num_seqs=4)
    outs = llm.generate(["def fib", "print"], SamplingParams(temperature=0, max_tokens=6))
    assert [o.prompt for o in outs] == ["def fib", "print"] and all(o.finished for o in outs)
    m = outs[0].metrics
    assert m.time_to_first_token > 0 and m.decode_time >= 0
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=5))[0]
    tok = llm.get_tokenizer()
    assert chat.prompt_token_ids == tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_engine_config_validation(text_model):
    with pytest.raises(ValueError, match="dtype = 'int3' is invalid"):
        LLM(model=text_model, dtype="int3")
    with pytest.raises(ValueError, match="max_num_seqs = 0 is invalid"):
        LLM(model=text_model, max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_memory = 'lots' is invalid"):
        LLM(model=text_model, kv_cache_memory="lots")
    with pytest.raises(ValueError, match="holds no 64-token block"):
        LLM(model=text_model, kv_cache_memory=1000)


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_allocated_cache_bytes_per_token_equal_the_cost_model(variant, hf_checkpoint):
    from moela.cost import formulas as cost
    from moela.cost.catalog import shape_from_model_config

    path, _ = hf_checkpoint(variant)
    engine = engine_for(path, dtype="bfloat16", block_size=8)
    allocated = sum(t.numel() * t.element_size() for layer in engine.runner.caches for t in layer.values())
    per_token = cost.cache_bytes_per_token(shape_from_model_config(engine.model_cfg), "bf16")
    assert allocated / engine.max_cached_tokens == engine.bytes_per_token == per_token


@pytest.mark.parametrize("variant", ["v32", "v4"])
def test_sparse_models_batch_share_prefixes_and_survive_preemption(variant, hf_checkpoint, caplog):
    """V3.2 caches indexer keys beside the latent (prefix caching works: both are per-token, paged); V4 keeps a
    window and compressor state per sequence (prefix caching is off, and says why). Outputs equal
    transformers' whether requests share prefixes, arrive mid-flight, or get preempted and recomputed."""
    import logging

    path, hf = hf_checkpoint(variant)
    system = prompts(1, seed=7, lo=24, hi=25)[0]
    ps = [system + tail for tail in prompts(6, seed=8, lo=3, hi=14)]
    refs = [hf_greedy(hf, p, 24) for p in ps]
    big = engine_for(path, block_size=8, max_num_batched_tokens=20)  # chunked prefill too
    outs = run(big, {0: [(ps[0], GREEDY)], 3: [(p, GREEDY) for p in ps[1:]]})
    assert [o.outputs[0].token_ids for o in outs] == refs
    cached = [o.num_cached_tokens for o in outs[1:]]
    assert cached == ([24] * 5 if variant == "v32" else [0] * 5)
    with caplog.at_level(logging.INFO, logger="moela.engine.llm"):
        small = engine_for(path, block_size=8, kv_cache_memory=big.bytes_per_token * 8 * 9
                           + 6 * big.layout.fixed_bytes_per_sequence, max_num_seqs=6)
    assert ("prefix caching is off" in caplog.text) == (variant == "v4")
    outs = run(small, {0: [(p, GREEDY) for p in ps]})
    assert small.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert small.blocks.num_free == small.blocks.num_blocks and len(small.blocks.free_slots) == small.blocks.num_slots


@pytest.mark.parametrize("variant", ["v32", "v4"])
def test_sparse_models_allocate_what_the_cost_model_counts(variant, hf_checkpoint):
    """Per token (V3.2's latent + indexer keys; V4's compressed entries) and per sequence (V4's window and
    compressor state), the engine allocates exactly the bytes moela's cost model counts."""
    from moela.cost import formulas as cost
    from moela.cost.catalog import shape_from_model_config

    path, _ = hf_checkpoint(variant)
    engine = engine_for(path, dtype="bfloat16", max_num_seqs=3)
    shape = shape_from_model_config(engine.model_cfg)
    layout, blocks = engine.layout, engine.blocks
    allocated = {kind: sum(t.numel() * t.element_size() for layer in engine.runner.caches for t in layer.values()
                           if (t.shape[0] == blocks.num_blocks) == paged) for kind, paged in (("paged", True), ("fixed", False))}
    assert allocated["paged"] / engine.max_cached_tokens == engine.bytes_per_token == cost.cache_bytes_per_token(shape, "bf16")
    assert allocated["fixed"] == 3 * layout.fixed_bytes_per_sequence == 3 * cost.cache_values_fixed(shape) * 2


def test_quantization_on_load_generates_like_bf16():
    """LLM(quantization=...) quantizes the embedded model as it loads: smaller weights, the same greedy
    continuation of a code prompt as the unquantized model for int8 (held-out mean KL ~1e-3) until the
    unquantized model's top two tokens are within 0.1 nats (a near-tie either may take), and the same
    first token for int4."""
    from moela.quantize import weight_bytes

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    runs = {}
    for quant in (None, "int8", "int4"):
        llm = LLM(quantization=quant, max_num_seqs=1)
        out = llm.generate(["def fibonacci(n):"], params)[0].outputs[0]
        runs[quant] = (out.token_ids, weight_bytes(llm.engine.model), out.logprobs)
        assert isinstance(llm.engine.model.head.weight, torch.Tensor) == (quant is None)
    top2 = [sorted(step.values(), reverse=True)[:2] for step in runs[None][2]]  # {token: logprob} per step
    clear = next((i for i, (a, b) in enumerate(top2) if a - b < 0.1), len(top2))  # tokens before the first near-tie
    assert clear >= 2, f"the unquantized model is torn after {clear} tokens: {top2}"
    assert runs["int8"][0][:clear] == runs[None][0][:clear] and runs["int4"][0][0] == runs[None][0][0]
    assert runs["int4"][1] < runs["int8"][1] < runs[None][1]
