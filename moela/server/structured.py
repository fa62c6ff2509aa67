"""The constraint a request puts on its output: OpenAI's `response_format` (json_object, json_schema),
vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and `structured_outputs`,
as the engine's GuidedDecodingParams, compiled here so that a bad schema is a 400 naming its field.

    guided = guided_decoding(req)                     # None: unconstrained; ApiError 400 naming the field
    guided = after_thinking(guided, token)            # --reasoning-parser: free <think> text first
"""

import re
from collections.abc import Callable

from moela.engine.guided import GuidedDecodingParams
from moela.server.protocol import ApiError, SamplingRequest
from moela.server.reasoning import think_rules

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def guided_decoding(req: SamplingRequest) -> GuidedDecodingParams | None:
    given = [(field, spec) for field, spec in _specs(req) if spec is not None]
    if len(given) > 1:
        raise ApiError(400, f"{given[0][0]} and {given[1][0]} both constrain the output: give one", param=given[1][0])
    if not given:
        return None
    field, spec = given[0]
    try:
        params = GuidedDecodingParams(**spec, whitespace_pattern=req.guided_whitespace_pattern)
        params.compiled()
    except ValueError as e:
        raise ApiError(400, re.sub(r"^guided_decoding(\.\w+)?", field, str(e)), param=field) from None
    return params


def _specs(req: SamplingRequest) -> list[tuple[str, dict | None]]:
    specs = [(field, {key: getattr(req, field)} if getattr(req, field) is not None else None)
             for field, key in GUIDED_FIELDS.items()]
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        raise ApiError(400, "response_format.json_schema is required when type is 'json_schema'", param="response_format")
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.json_schema if rf.json_schema is not None else None
        specs.append(("response_format", {"json": schema} if schema is not None else {"json_object": True}))
    if (so := req.structured_outputs) is not None:
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                  "json_object": so.json_object}
        specs.append(("structured_outputs", {k: v for k, v in fields.items() if v is not None and v is not False}))
    return specs


def after_thinking(params: GuidedDecodingParams | None, token: Callable[[str], str]) -> GuidedDecodingParams | None:
    """The same constraint, after a free reasoning part that ends with </think> (a full Lark grammar stays as is)."""
    if params is None or params.grammar is not None:
        return params
    return GuidedDecodingParams(grammar="\n".join(["%llguidance {}", f"start: think {params.lark()}", *think_rules(token)]))
