"""`--reasoning-parser deepseek_r1`: the <think> part goes to reasoning_content, identically streamed or not
(unit tests of the splitter on every way of cutting a text, then a model scripted to think out loud)."""

import json
import random

import pytest

from moela.server.reasoning import ReasoningSplitter
from test_server import ANSWER, REASONING, ThreadServer, tiny_model


def split_in_pieces(text: str, cuts: list[int]) -> tuple[str, str]:
    splitter, pieces = ReasoningSplitter(), [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    reasoning = content = ""
    for i, piece in enumerate(pieces):
        r, c = splitter.feed(piece, final=i == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("text,want", [
    ("<think>abc</think>answer", ("abc", "answer")),
    ("abc</think>answer", ("abc", "answer")),  # R1's template opened <think> already
    ("<think>still thinking", ("still thinking", "")),
    ("no tags at all", ("no tags at all", "")),
    ("</think>", ("", "")),
    ("<thi", ("<thi", "")),
    ("a</thin", ("a</thin", "")),
    ("x</think>y</think>z", ("x", "y</think>z")),
    ("<think><think>a</think>b", ("<think>a", "b")),
])
def test_split_is_the_same_however_the_text_is_cut(text, want):
    assert ReasoningSplitter().feed(text, final=True) == want
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, len(text)))) if len(text) > 1 else []
        assert split_in_pieces(text, cuts) == want, cuts


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory, "scripted")
    srv = ThreadServer(path, reasoning_parser="deepseek_r1").start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_reasoning_content_streamed_and_not(server, temperature):
    body = {"messages": [{"role": "user", "content": "fib?"}], "max_tokens": 20, "temperature": temperature, "seed": 0}
    message = server.post("/v1/chat/completions", body).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (REASONING, ANSWER)
    r = server.post("/v1/chat/completions", {**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # EOS
    assert not any("<think>" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)


def test_without_the_parser_the_tags_stay_in_content(tmp_path_factory):
    path, _ = tiny_model(tmp_path_factory, "scripted")
    srv = ThreadServer(path).start()
    try:
        out = srv.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fib?"}], max_tokens=20)
        assert out.choices[0].message.content == f"<think>{REASONING}</think>{ANSWER}"
    finally:
        srv.stop()
