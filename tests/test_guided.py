"""Guided decoding and logit_bias through the LLM API (engine/guided.py): every kind of grammar on the
embedded default model, greedy and sampled, batched with unconstrained requests; the mask itself
against llguidance's; the bias's bounds and effect."""

import json
import re

import jsonschema_rs
import pytest
import torch
from llguidance import LLMatcher

from moela.engine.guided import GuidedDecodingParams, Guides
from moela.engine.llm import LLM
from moela.engine.sampler import SamplingParams

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", threads=1, max_num_seqs=8, max_model_len=256)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3, top_p=0.9)])
def test_every_grammar_kind_holds_in_a_mixed_batch(llm, sampling):
    kinds = [GuidedDecodingParams(json=PERSON), GuidedDecodingParams(json=json.dumps(PERSON)),
             GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}"), GuidedDecodingParams(choice=["yes", "no", "maybe"]),
             GuidedDecodingParams(grammar='start: "def " NAME "(n):"\nNAME: /[a-z_]{1,10}/')]
    params = [SamplingParams(max_tokens=64, guided_decoding=g, **sampling) for g in kinds]
    params.append(SamplingParams(max_tokens=8, ignore_eos=True, **sampling))  # an unconstrained neighbour
    outs = llm.generate(["def fibonacci(n):"] * len(params), params)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:-1]), texts
    assert jsonschema_rs.is_valid(PERSON, json.loads(texts[0])) and jsonschema_rs.is_valid(PERSON, json.loads(texts[1]))
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[2]) and texts[3] in ("yes", "no", "maybe")
    assert re.fullmatch(r"def [a-z_]{1,10}\(n\):", texts[4])
    alone = llm.generate(["def fibonacci(n):"], params[-1])[0].outputs[0].text
    assert texts[-1] == alone  # the masks touched only their own rows


def test_n_samples_each_follow_the_grammar(llm):
    out = llm.generate(["import os"], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=80,
                                                      guided_decoding=GuidedDecodingParams(json=PERSON)))[0]
    for o in out.outputs:
        assert o.finish_reason == "stop" and jsonschema_rs.is_valid(PERSON, json.loads(o.text)), o.text


def test_json_object_is_compact_json(llm):
    out = llm.generate(["x = "], SamplingParams(temperature=0, max_tokens=120, guided_decoding=GuidedDecodingParams(
        json={"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
              "required": ["k"], "additionalProperties": False})))[0].outputs[0]
    assert out.finish_reason == "stop" and "\n" not in out.text and len(json.loads(out.text)["k"]) <= 3


def test_mask_on_device_matches_llguidance(llm):
    guides, vocab = llm.engine.guides, llm.engine.model_cfg.vocab_size
    [guide] = guides.start(SamplingParams(guided_decoding=GuidedDecodingParams(json=PERSON)), 1)
    reference = LLMatcher(guides.lltok, GuidedDecodingParams(json=PERSON).compiled())
    for token in guides.lltok.tokenize_str('{"name": "ab'):
        logits = guides.apply(torch.zeros(1, vocab), [guide])
        bits = torch.tensor(list(reference.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> torch.arange(8)) & 1).flatten()[:vocab].bool()
        assert torch.equal(torch.isfinite(logits[0]), allowed) and 0 < allowed.sum() < vocab
        assert not Guides.accept(guide, token)
        reference.consume_token(token)


def test_logit_bias_forces_and_bans(llm):
    tok = llm.get_tokenizer()
    seven = tok.encode("7", add_special_tokens=False)[0]
    forced = llm.generate(["x = "], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={seven: 100}))
    assert forced[0].outputs[0].token_ids == [seven] * 4
    plain = llm.generate(["x = "], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    banned = llm.generate(["x = "], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                  logit_bias={plain[0]: -100}))[0].outputs[0].token_ids
    assert banned[0] != plain[0]


@pytest.mark.parametrize("bad", [{5: 100.5}, {5: float("nan")}, {-1: 1.0}, {"5": 1.0}, {5: True}])
def test_logit_bias_out_of_bounds_is_refused(bad):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bad)


def test_logit_bias_outside_the_vocabulary_and_bad_grammars_are_refused_at_admission(llm):
    vocab = llm.engine.model_cfg.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.engine.add_request("x", SamplingParams(logit_bias={vocab: 1.0}))
    for bad in [dict(json={"type": "objectx"}), dict(regex="[a-"), dict(grammar="start: ("), dict(json="{no")]:
        with pytest.raises(ValueError, match="guided_decoding"):
            llm.engine.add_request("x", SamplingParams(guided_decoding=GuidedDecodingParams(**bad)))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("bad", [dict(), dict(json={}, regex="a"), dict(choice=[]), dict(choice=["a", 1]), dict(json=5)])
def test_guided_params_need_exactly_one_valid_field(bad):
    with pytest.raises(ValueError, match="guided_decoding"):
        GuidedDecodingParams(**bad)


def test_errors_name_the_cause_not_the_grammar_moela_wrapped_it_in():
    errors = {}
    for field, bad in [("json", {"properties": [1]}), ("regex", "[a-"), ("grammar", "start: (")]:
        with pytest.raises(ValueError) as e:
            GuidedDecodingParams(**{field: bad}).compiled()
        errors[field] = str(e.value)
    assert errors["json"] == "guided_decoding.json is invalid: failed to compile JSON schema: properties must be an object"
    assert "unclosed character class" in errors["regex"] and "start:" not in errors["regex"]
    assert "1 | start: (" in errors["grammar"]  # a user's own grammar: where in it
