"""MTP speculative decoding: greedy output identical with and without it (batches, chunked prefill,
prefix caching, preemption, stops, penalties), sampled output distributed as the model's (chi-square on
a tiny vocabulary), rejection sampling alone, the stats and metrics, the CLI flag, and clear errors."""

import json
import math
import random
import re

import pytest
import torch

from conftest import build_hf, engine_for
from moela import LLM, SamplingParams
from moela.config import DEFAULT_MODEL_DIR, ModelConfig
from moela.engine.config import EngineConfig, SpeculativeConfig
from moela.engine.speculative import rejection_sample
from moela.errors import CheckpointError, ConfigError
from moela.loader import load_model, save_model
from moela.models import StepContext
from moela.models.mtp import MTP

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):", "for i in range(",
           "# utilities\n\ndef parse(text):\n    return"]


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def greedy_reference():
    llm = LLM(dtype="float32", max_num_batched_tokens=64)
    return token_ids(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_identical_with_chunked_prefill_and_preemption(greedy_reference, k):
    """The embedded model's five prompts at once, prompts cut into 8-token chunks, a cache too small for all
    of them (sequences preempted and recomputed)."""
    cfg = ModelConfig.from_pretrained(DEFAULT_MODEL_DIR)
    per_token = (cfg.num_hidden_layers + 1) * cfg.latent_dim * 4  # fp32 latents of every layer and the MTP's
    llm = LLM(dtype="float32", speculative_config=spec(k), block_size=8, max_num_batched_tokens=8 + 5 * (k + 1),
              kv_cache_memory=per_token * 8 * 14, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine = llm.engine
    assert token_ids(outs) == greedy_reference
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks and engine.bytes_per_token == per_token
    s = engine.stats()
    assert 0 < s["spec_decode_num_accepted_tokens"] <= s["spec_decode_num_draft_tokens"] <= k * s["spec_decode_num_drafts"]
    assert sum(s["spec_decode_num_accepted_tokens_per_pos"]) == s["spec_decode_num_accepted_tokens"]
    assert s["generation_tokens"] == 5 * 40


def test_greedy_identical_with_prefix_caching_stops_penalties_and_logprobs():
    params = [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, stop=["\n\n"], min_tokens=3),
              SamplingParams(temperature=0, max_tokens=30, presence_penalty=0.5, frequency_penalty=0.5)]
    prompts = ["import math\n\n\ndef fibonacci(n):\n    " + p for p in ("", "if n", "return")]
    ref = LLM(dtype="float32").generate(prompts, params)
    llm = LLM(dtype="float32", block_size=8, speculative_config=spec(2))
    outs = llm.generate(prompts, params) + llm.generate(prompts, params)  # the second time from the prefix cache
    for a, b in zip(outs, ref + ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    for lp, ref_lp in zip(outs[0].outputs[0].logprobs, ref[0].outputs[0].logprobs):
        assert lp.keys() == ref_lp.keys() and all(math.isclose(lp[t], ref_lp[t], abs_tol=1e-4) for t in lp)
    assert outs[4].num_cached_tokens >= 8


def test_greedy_identical_on_the_cpu_backend_in_bf16():
    base = LLM()
    if base.engine.backend.name != "cpu":
        pytest.skip("the cpu backend is not available here")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = LLM(speculative_config=spec(2)).generate(PROMPTS[:3], params)
    assert token_ids(outs) == token_ids(base.generate(PROMPTS[:3], params))


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch():
    llm = LLM(dtype="float32", speculative_config=spec(2))
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=11)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    together = llm.generate(PROMPTS, [params] + [SamplingParams(temperature=1.0, max_tokens=24, seed=i) for i in range(4)])
    assert together[0].outputs[0].token_ids == alone


def test_rejection_sampling_follows_the_target_distribution():
    """Drafts from q, kept or replaced by (p - q)+: each emitted position is distributed as p (chi-square)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.4, 0.1, 0.1]])
    first, second, n = torch.zeros(4), torch.zeros(4), 20000
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        accept, emit = rejection_sample(p, drafts, q, g, greedy=False)
        first[drafts[0] if accept[0] else emit[0]] += 1
        if accept[0]:  # the second position, given the first draft was kept
            second[drafts[1] if accept[1] else emit[1]] += 1
    for counts, target in ((first, p[0]), (second, p[1])):
        expected = counts.sum() * target
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    accept, emit = rejection_sample(p, [2, 3], None, None, greedy=True)
    assert accept.tolist() == [False, True] and emit.tolist() == [0, 3, 0]


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory):
    """A tiny random V3 with a 6-token vocabulary and a random MTP layer, so drafts are often wrong."""
    hf_dir = tmp_path_factory.mktemp("tiny-vocab-hf")
    build_hf("v3", vocab_size=6, bos_token_id=0, eos_token_id=1).save_pretrained(hf_dir)
    return with_mtp(hf_dir, tmp_path_factory.mktemp("tiny-vocab-mtp"))


def with_mtp(hf_dir, out, seed: int = 0):
    """hf_dir's model re-saved by moela with a random MTP layer (and DeepSeek-V3's copies of the embedding
    and head in that layer, which the engine does not read)."""
    from safetensors.torch import load_file, save_file

    model = load_model(hf_dir, torch.float32)
    torch.manual_seed(seed)
    mtp = MTP(model.cfg)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    config = json.loads((hf_dir / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    save_model(model, out, mtp=mtp, config=config)
    tensors = load_file(out / "model.safetensors")
    layer = f"model.layers.{model.cfg.num_hidden_layers}."
    tensors[layer + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[layer + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)])
def test_sampled_output_follows_the_model_distribution(tiny_vocab_model, sampling):
    """2,000 seeded samples of four tokens with two drafts per step: tokens 2 and 3 come from verifying
    steps; their joint frequencies against the model's exact distribution (chi-square over the 36 pairs)
    and a total-variation bound."""
    from moela.engine.sampler import probabilities

    prompt, n_req, n, V = [0, 3, 5, 2], 16, 125, 6
    engine = engine_for(tiny_vocab_model, max_num_seqs=128, speculative_config=spec(2))
    params = [SamplingParams(n=n, max_tokens=4, ignore_eos=True, seed=1000 * i, **sampling) for i in range(n_req)]
    for i, p in enumerate(params):
        engine.add_request(prompt, p, request_id=str(i))
    counts = torch.zeros(V, V)
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs if out.finished else []:
                counts[c.token_ids[1], c.token_ids[2]] += 1
    s = engine.stats()
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]  # drafts both kept and rejected
    model = load_model(tiny_vocab_model, torch.float32)
    seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])  # [36, 6]
    ctx = StepContext.prefill([6] * V * V)
    with torch.no_grad():
        logits = model.logits(model(seqs.flatten(), ctx.positions, ctx)).view(V, V, 6, -1)
    sp = SamplingParams(**sampling)
    dist = lambda rows: probabilities(rows.reshape(-1, rows.shape[-1]), [sp] * (rows.numel() // rows.shape[-1]))  # noqa: E731
    p1, p2, p3 = dist(logits[0, 0, 3]), dist(logits[:, 0, 4]), dist(logits[:, :, 5]).view(V, V, V)
    exact = torch.einsum("a,ab,abc->bc", p1[0], p2, p3)  # P(t2, t3) = sum over t1 of P(t1) P(t2 | t1) P(t3 | t1, t2)
    total = counts.sum()
    assert total == n_req * n
    mask = exact > 1e-9
    assert counts[~mask].sum() == 0  # nothing outside top-p's support
    expected = total * exact[mask]
    chi2 = ((counts[mask] - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_quantile_999(int(mask.sum()) - 1)
    assert 0.5 * (counts / total - exact).abs().sum() < 0.06


def chi2_quantile_999(dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square 0.999 quantile."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_grammar_and_logit_bias_requests_decode_undrafted_beside_drafting_ones():
    """A sequence with a grammar or a logit bias gets no drafts: the engine's sampler, which applies both,
    decodes it one token a step, so it gives what it gives without speculation; its neighbour drafts."""
    from moela.engine.guided import GuidedDecodingParams

    params = [SamplingParams(temperature=0, max_tokens=32, guided_decoding=GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}")),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={7: 100}),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    plain = token_ids(LLM(dtype="float32").generate(PROMPTS[:3], params))
    llm = LLM(dtype="float32", speculative_config=spec(2))
    outs = llm.generate(PROMPTS[:3], params)
    assert token_ids(outs) == plain and plain[1] == [7] * 6
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outs[0].outputs[0].text)
    stats = llm.engine.stats()
    assert 0 < stats["spec_decode_num_drafts"] <= 24  # only the unconstrained one drafted, at most once a token


def test_greedy_identical_with_int8_weights():
    """A quantized model verifies the drafts of its MTP layer, which stays in the model dtype."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = token_ids(LLM(dtype="float32", quantization="int8").generate(PROMPTS[:2], params))
    llm = LLM(dtype="float32", quantization="int8", speculative_config=spec(2))
    assert token_ids(llm.generate(PROMPTS[:2], params)) == plain
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0


def test_engine_stats_and_prometheus_metrics_with_speculation():
    from prometheus_client.parser import text_string_to_metric_families

    from moela.server.metrics import ServerMetrics

    llm = LLM(dtype="float32", speculative_config=spec(2))
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=20))
    stats = llm.engine.stats() | {"expert_load": {}}
    assert "spec_decode_num_drafts" not in LLM(dtype="float32").engine.stats()
    text = ServerMetrics(lambda: stats).render().decode()
    values = {s.name + str(s.labels.get("position", "")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    accepted, drafted = stats["spec_decode_num_accepted_tokens"], stats["spec_decode_num_draft_tokens"]
    assert values["moela:spec_decode_num_accepted_tokens_total"] == accepted
    assert values["moela:spec_decode_num_draft_tokens_total"] == drafted
    assert values["moela:spec_decode_num_accepted_tokens_per_pos_total1"] == stats["spec_decode_num_accepted_tokens_per_pos"][1]
    assert values["moela:spec_decode_acceptance_rate"] == pytest.approx(accepted / drafted)
    assert values["moela:spec_decode_mean_acceptance_length"] == pytest.approx(1 + accepted / stats["spec_decode_num_drafts"])


def test_server_with_speculation_answers_and_counts_drafts():
    from test_server import ThreadServer

    server = ThreadServer(DEFAULT_MODEL_DIR, speculative_config=spec(2), max_model_len=256).start()
    try:
        reply = server.client().completions.create(model=server.name, prompt=PROMPTS[0], max_tokens=16, temperature=0)
        ref = LLM(dtype="float32").generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16))
        assert reply.choices[0].text == ref[0].outputs[0].text
        assert server.metrics()["moela:spec_decode_num_draft_tokens_total"] > 0
    finally:
        server.stop()


def test_cli_flag_gives_the_same_greedy_text(capsys):
    from moela.cli import main

    args = ["generate", "--dtype", "float32", "--temperature", "0", "--max-tokens", "16", PROMPTS[0]]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']) == 0
    assert capsys.readouterr().out == plain
    with pytest.raises(SystemExit):
        main(args + ["--speculative-config", '{"method": "eagle"}'])
    assert "'eagle' is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ({"method": "ngram"}, "method = 'ngram' is not supported"),
    ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens = 0 is invalid"),
    ({"method": "mtp", "draft_model": "x"}, "field 'draft_model' is not supported"),
    ("{not json", "is not valid JSON"),
    ([1], "must be a dict"),
])
def test_bad_speculative_config_is_named(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)


def test_deepseek_mtp_is_vllms_older_name_for_mtp():
    assert SpeculativeConfig.parse('{"method": "deepseek_mtp"}') == SpeculativeConfig("mtp", 1)


def test_checkpoints_without_an_mtp_layer_are_refused(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("v3")  # config says one MTP layer, transformers saved none
    with pytest.raises(CheckpointError, match="missing MTP tensor 'model.layers.3."):
        engine_for(path, speculative_config=spec(1))
    v2, _ = hf_checkpoint("v2")
    with pytest.raises(ConfigError, match="supports deepseek_v3, kimi_k2 checkpoints; this one is deepseek_v2"):
        engine_for(v2, speculative_config=spec(1))
    build_hf("v3", num_nextn_predict_layers=0).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_nextn_predict_layers = 0"):
        engine_for(tmp_path, speculative_config=spec(1))


def test_random_v3_with_mtp_layer_greedy_identical_in_a_mixed_batch(hf_checkpoint, tmp_path):
    """A random V3 checkpoint with DeepSeek-V3's MTP layer layout: requests arriving mid-run, long prompts
    chunked, output identical with and without three drafts per step."""
    path = with_mtp(hf_checkpoint("v3")[0], tmp_path)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 128) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = []
    for speculative in (None, spec(3)):
        engine = engine_for(path, block_size=4, max_num_batched_tokens=32, speculative_config=speculative)
        ids = [engine.add_request(p, params) for p in prompts[:3]]
        done, step = {}, 0
        while engine.has_unfinished():
            if step == 2:
                ids += [engine.add_request(p, params) for p in prompts[3:]]
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
            step += 1
        results.append([done[i] for i in ids])
        assert engine.blocks.num_free == engine.blocks.num_blocks
    assert results[0] == results[1]
