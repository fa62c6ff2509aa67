"""Tool calls in DeepSeek's four formats: parsing them out of a completion (whole or streamed), the
grammar that forces a call (tool_choice "required" or a named function) or keeps calls valid if the
model makes any (strict tools under "auto"), and the tool list written
for a chat template that does not render tools itself.

    fmt = FORMATS["deepseek_v31"]
    content, calls = fmt.parse(text, final=True)           # calls: [(name, arguments JSON text)]
    stream = ToolCallStream(fmt, parallel=True)            # one per choice; parallel=False keeps the first call
    content_delta, call_deltas = stream.feed(delta_text)   # OpenAI's delta.tool_calls entries
    token = lambda s: json.dumps(s)                        # a marker as a literal (or "<[id]>": its special token)
    lark = call_grammar(fmt, tools, name=None, parallel=True, token=token)
    lark = call_grammar(fmt, tools, None, True, token, optional=True)   # content, then calls or none

The formats (what the model writes after its content):
    deepseek_v3   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    deepseek_v31  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    deepseek_v32  <｜DSML｜function_calls>\\n<｜DSML｜invoke name="NAME">\\n<｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>...</｜DSML｜invoke>...</｜DSML｜function_calls>
    deepseek_v4   the same with <｜DSML｜tool_calls> as the block's tag

`parse(text, final)` returns only what later text cannot change (a marker cut in half, trailing
whitespace and an unfinished value are held back until `final`), so each parse of a longer text
extends the previous one: streamed deltas are the differences between successive parses and add up
to exactly the whole-text parse. Content is the text before the block; text after it is dropped.
"""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moela.engine.guided import json_lark
from moela.server.reasoning import think_rules

Call = tuple[str, str]  # (function name, arguments as JSON text)
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DSML = "｜DSML｜"
PARAM_END = f"</{DSML}parameter>"
PARAM_HEAD = re.compile(rf'<{DSML}parameter name="([^"]*)"\s+string="(true|false)"\s*>')
PLAIN_STRING_KEYS = {"type", "description", "title", "examples", "default"}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    begin: str  # opens the block of calls
    end: str  # closes it
    dsml: bool  # parameters as DSML tags (V3.2, V4) rather than JSON arguments (V3, V3.1)
    fenced: bool = False  # V3: "function<sep>NAME" then the arguments in a ```json fence

    def parse(self, text: str, final: bool) -> tuple[str, list[Call]]:
        start = text.find(self.begin)
        if start < 0:
            return (text if final else _held(text, self.begin)), []
        stop = text.find(self.end, start)
        block = text[start + len(self.begin): stop if stop >= 0 else len(text)]
        calls = _dsml_calls(block, final or stop >= 0) if self.dsml else self._json_calls(block, final or stop >= 0)
        return text[:start].rstrip(), calls

    def _json_calls(self, block: str, final: bool) -> list[Call]:
        calls = []
        for piece in block.split(CALL_BEGIN)[1:]:
            head, sep, rest = piece.partition(SEP)
            if not sep:
                break  # the name is not complete yet
            if self.fenced:  # head is the type ("function"); the name runs to the end of its line
                cut = re.search(r"[\n`]", rest)
                if cut is None and not final:
                    break
                name, rest = (rest, "") if cut is None else (rest[: cut.start()], rest[cut.start():])
            else:
                name = head
            args, closed, _ = rest.partition(CALL_END)
            calls.append((name.strip(), _arguments(args, bool(closed) or final, self.fenced)))
            if not closed:
                break
        return calls

    def example(self) -> str:
        if self.dsml:
            return (f'{self.begin}\n<{DSML}invoke name="NAME">\n<{DSML}parameter name="KEY" string="true">a string'
                    f'{PARAM_END}\n<{DSML}parameter name="KEY2" string="false">any other JSON value{PARAM_END}\n'
                    f'</{DSML}invoke>\n{self.end}')
        if self.fenced:
            return f"{self.begin}{CALL_BEGIN}function{SEP}NAME\n```json\nARGUMENTS\n```{CALL_END}{self.end}"
        return f"{self.begin}{CALL_BEGIN}NAME{SEP}ARGUMENTS{CALL_END}{self.end}"


FORMATS = {f.name: f for f in (
    ToolFormat("deepseek_v3", CALLS_BEGIN, CALLS_END, dsml=False, fenced=True),
    ToolFormat("deepseek_v31", CALLS_BEGIN, CALLS_END, dsml=False),
    ToolFormat("deepseek_v32", f"<{DSML}function_calls>", f"</{DSML}function_calls>", dsml=True),
    ToolFormat("deepseek_v4", f"<{DSML}tool_calls>", f"</{DSML}tool_calls>", dsml=True),
)}


def detect_format(model_type: str, chat_template: str | None) -> ToolFormat:
    """The format a model was trained on, from its model_type and the chat template's own markers."""
    template = chat_template or ""
    if model_type == "deepseek_v4" or f"{DSML}tool_calls" in template:
        return FORMATS["deepseek_v4"]
    if model_type == "deepseek_v32" or DSML in template:
        return FORMATS["deepseek_v32"]
    return FORMATS["deepseek_v3" if "```json" in template else "deepseek_v31"]


def _held(text: str, marker: str) -> str:
    """Content that stays content whatever comes next: without a marker cut at the end or trailing whitespace."""
    return _before_partial(text, marker).rstrip()


def _before_partial(text: str, marker: str) -> str:
    """`text` without the start of `marker` it may end with."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return text[:-n]
    return text


def _arguments(text: str, closed: bool, fenced: bool) -> str:
    text = text.lstrip() if closed else _before_partial(text, CALL_END).lstrip()
    if fenced:
        if not closed and "```json".startswith(text):
            return ""
        text = text[7:] if text.startswith("```json") else text[3:] if text.startswith("```") else text
        text = text.lstrip()
        if not closed:
            return text.rstrip(" \t\r\n`")
        text = text.rstrip()
        text = text[:-3] if text.endswith("```") else text
    return text.rstrip()


def _dsml_calls(block: str, final: bool) -> list[Call]:
    calls = []
    for piece in block.split(f"<{DSML}invoke name=\"")[1:]:
        name, opened, body = piece.partition('">')
        if not opened:
            break
        body, closed, _ = body.partition(f"</{DSML}invoke>")
        items = []
        for head in PARAM_HEAD.finditer(body):
            value, complete, _ = body[head.end():].partition(PARAM_END)
            if not complete:
                break
            items.append(json.dumps(head[1], ensure_ascii=False) + ": " + _dsml_value(value, head[2] == "true"))
        calls.append((name, "{" + ", ".join(items) + ("}" if closed or final else "")))
        if not closed:
            break
    return calls


def _dsml_value(value: str, is_string: bool) -> str:
    if not is_string:
        try:
            return json.dumps(json.loads(value), ensure_ascii=False)
        except json.JSONDecodeError:
            pass  # not JSON after all: kept as the string the model wrote
    return json.dumps(value, ensure_ascii=False)


class ToolCallStream:
    """One choice's completion, fed piece by piece: content deltas and OpenAI `delta.tool_calls` entries."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True):
        self.fmt, self.text, self.limit = fmt, "", None if parallel else 1  # parallel False: the first call only
        self.content_sent, self.args_sent = 0, []  # characters of content / of each call's arguments sent

    def feed(self, piece: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.text += piece
        content, calls = self.fmt.parse(self.text, final)
        calls = calls[:self.limit]
        delta, self.content_sent = content[self.content_sent:], max(self.content_sent, len(content))
        entries = []
        for i, (name, args) in enumerate(calls):
            if i == len(self.args_sent):
                entries.append({"index": i, **tool_call(name, args)})
                self.args_sent.append(len(args))
            elif len(args) > self.args_sent[i]:
                entries.append({"index": i, "function": {"arguments": args[self.args_sent[i]:]}})
                self.args_sent[i] = len(args)
        return delta, entries

    @property
    def called(self) -> bool:
        return bool(self.args_sent)


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def call_grammar(fmt: ToolFormat, tools: list[dict], name: str | None, parallel: bool, token: Callable[[str], str],
                 think: bool = False, optional: bool = False) -> str:
    """Lark for output that is one call of `name` (or one or more calls of any of `tools`), arguments valid
    against each function's JSON schema. `token(s)` writes a marker: its special token's id, or a literal.
    `think`: a reasoning part ending with </think> comes first. `optional`: free content, then calls or
    none (tool_choice "auto" with strict tools)."""
    chosen = [t for t in tools if name is None or t["name"] == name]
    rules = [f"call_{i}: " + (_dsml_invoke(fmt, t, i) if fmt.dsml else _json_call(fmt, t, token)) for i, t in enumerate(chosen)]
    joiner = '"\\n" ' if fmt.dsml or fmt.fenced else ""
    calls = f"call ({joiner}call)*" if parallel and name is None else "call"
    newline = '"\\n" ' if fmt.dsml else ""
    begin, block = token(fmt.begin), f"{newline}{calls} {newline}{token(fmt.end)}"
    if not optional:
        body = [f"{begin} {block}"]
    elif begin.startswith("<["):  # a special token, which free text cannot contain
        body = [f"CONTENT ({begin} {block})?", r"CONTENT: /(.|\n)*/"]
    else:  # free text up to the first marker, then calls; or text without the marker
        marker = "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in fmt.begin)
        body = [f"(PLAIN | opening {block})", f"opening[lazy]: CONTENT {begin}", r"CONTENT: /(.|\n)*/",
                rf"PLAIN: /(.|\n)*/ & ~/(.|\n)*{marker}(.|\n)*/"]
    lines = ["%llguidance {}", f"start: {'think ' if think else ''}{body[0]}", *body[1:],
             "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))), *rules]
    return "\n".join(lines + (think_rules(token) if think else []))


def _json_call(fmt: ToolFormat, tool: dict, token: Callable[[str], str]) -> str:
    args = json_lark(tool.get("parameters") or {"type": "object"})
    if fmt.fenced:
        return f'{token(CALL_BEGIN)} "function" {token(SEP)} {json.dumps(tool["name"] + chr(10) + "```json" + chr(10))} ' \
               f'{args} "\\n```" {token(CALL_END)}'
    return f"{token(CALL_BEGIN)} {json.dumps(tool['name'])} {token(SEP)} {args} {token(CALL_END)}"


def _dsml_invoke(fmt: ToolFormat, tool: dict, i: int) -> str:
    """One invoke: each property a parameter, in the schema's order, the required ones always."""
    schema = tool.get("parameters") or {}
    props, required = dict(schema.get("properties") or {}), list(schema.get("required") or [])
    props.update({key: {} for key in required if key not in props})
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    params = []
    for key, sub in props.items():
        head = f'\\n<{DSML}parameter name=\\"{_lark_text(key)}\\" string='
        if isinstance(sub, dict) and set(sub) <= PLAIN_STRING_KEYS and sub.get("type") == "string":
            value = f'"{head}\\"true\\">" /[^<]*/'  # a plain string, written as is
        elif choices := _string_choices(sub):  # one of some strings, written as is too
            value = f'"{head}\\"true\\">" (' + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices) + ")"
        else:
            value = f'"{head}\\"false\\">" ' + json_lark({**sub, **defs} if isinstance(sub, dict) else sub)
        params.append(f"({value} \"{PARAM_END}\")" + ("" if key in required else "?"))
    return f'"<{DSML}invoke name=\\"{_lark_text(tool["name"])}\\">" {" ".join(params)} "\\n</{DSML}invoke>"'


def _string_choices(sub: Any) -> list[str] | None:
    """The values of a property that is an enum (or const) of strings only."""
    if not isinstance(sub, dict) or not set(sub) <= PLAIN_STRING_KEYS | {"enum", "const"} \
            or sub.get("type", "string") != "string":
        return None
    values = sub["enum"] if "enum" in sub else [sub["const"]] if "const" in sub else None
    return values if isinstance(values, list) and values and all(isinstance(v, str) for v in values) else None


def _lark_text(s: str) -> str:
    return json.dumps(s)[1:-1]


def describe(fmt: ToolFormat, tools: list[dict]) -> str:
    """The tools as a system message, for chat templates that do not render `tools` themselves."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (f"You can call the functions below. To call one or more, write exactly this and nothing after it:\n"
            f"{fmt.example()}\nwhere ARGUMENTS is a JSON object valid against the function's parameters schema.\n\n"
            f"Functions:\n{listing}")
