"""Tokenizer and chat template against transformers; streaming detokenization never splits a character."""

import json

import pytest

from conftest import CORPUS, make_tokenizer
from moela.errors import TokenizerError
from moela.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "fibonacci?"},
            {"role": "assistant", "content": "def fibonacci(n): ..."}, {"role": "user", "content": "naïve 🙂"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return path


def test_encode_decode_match_transformers(tok_dir):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    for text in CORPUS[:3] + ["", "  spaces  ", "unknown ✓ symbols ∑"]:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    assert ours.bos_token_id == 0 and ours.eos_token_id == 1


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok_dir, add_generation_prompt):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ref.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(text, add_special_tokens=False) == list(ids)
    assert text.startswith(ours.bos_token) and text.count(ours.bos_token) == 1


def test_raise_exception_in_template(tok_dir):
    with pytest.raises(TokenizerError, match="unknown role: robot"):
        Tokenizer.from_pretrained(tok_dir).apply_chat_template([{"role": "robot", "content": "x"}])


def test_template_is_sandboxed(tmp_path):
    make_tokenizer(tmp_path, template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="chat template error"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES)


def test_template_list_form_and_jinja_file(tmp_path):
    make_tokenizer(tmp_path, template=None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES) == "D4"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content']|tojson }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES) == 'J"You write Python."'


def test_no_template_and_bad_files(tmp_path):
    make_tokenizer(tmp_path, template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[]")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_stream_never_splits_a_character(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "héllo 你好世界 🙂🚀 café"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    stream = tok.stream()
    pieces = [stream.step(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert "" in pieces[:-1]  # some tokens held back until their character completed


def test_stream_flushes_an_incomplete_tail(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    ids = tok.encode("🙂", add_special_tokens=False)
    stream = tok.stream()
    held = [stream.step(i) for i in ids[:-1]]
    assert "".join(held) == "" and stream.flush() != ""
