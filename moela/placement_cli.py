"""`moela plan-experts`: an expert placement for expert parallelism, balanced on recorded traffic.

    curl -s 127.0.0.1:8000/metrics > metrics.txt             # a running `moela serve` counts routed tokens
    moela plan-experts metrics.txt --ranks 8 --redundant 8 --out placement.json
    moela plan-experts load.json --ranks 8                    # {"layer": [tokens per expert]}: LLMEngine.expert_load()
    moela plan-experts --record DIR --prompts prompts.txt --ranks 4 --out placement.json   # measure here first
    moela plan-experts load.json --ranks 64 --redundant 64 --model deepseek-v3 --hardware h800 --link-gbs 50

It prints, per MoE layer, the max/mean routed load per rank with the experts in order and with the plan;
with --model and --hardware, the cost model's tensor vs expert parallel decode step at both balances
(the same formula `moela cost --imbalance` uses). The plan runs with
`moela serve DIR --tensor-parallel-size N --enable-expert-parallel --expert-placement placement.json`.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from moela.config import HelpFormatter
from moela.errors import MoelaError
from moela.placement import Placement, imbalance, plan_placement

METRIC = re.compile(r"^moela:routed_expert_tokens(?:_total)?\{([^}]*)\}\s+(\S+)", re.MULTILINE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moela plan-experts", formatter_class=HelpFormatter,
                                description="Place routed experts (with redundant copies of hot ones) on expert-parallel "
                                            "ranks so that recorded load is balanced, in the manner of DeepSeek's EPLB.")
    p.add_argument("load", nargs="?", type=Path, help="recorded load: a `moela serve` /metrics scrape, or JSON "
                   "{layer: [tokens per expert]} as LLMEngine.expert_load() returns")
    p.add_argument("--record", metavar="MODEL_DIR", help="measure the load here instead: run this model on --prompts")
    p.add_argument("--prompts", type=Path, help="with --record: a text file, one prompt per line")
    p.add_argument("--max-tokens", type=int, default=64, help="with --record: tokens generated per prompt")
    p.add_argument("--save-load", type=Path, help="with --record: also write the measured load as JSON")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks (expert groups)")
    p.add_argument("--redundant", type=int, default=0, help="extra expert copies over all ranks (hot experts twice)")
    p.add_argument("--out", type=Path, help="write the plan here (JSON) for --expert-placement")
    p.add_argument("--model", help="with --hardware: catalog model or config.json for the cost model's verdict")
    p.add_argument("--hardware", help="with --model: catalog chip")
    p.add_argument("--batch", type=int, default=256, help="with --model: decode batch over all ranks")
    p.add_argument("--context", type=int, default=4096, help="with --model: context per sequence")
    p.add_argument("--dtype", default="fp8", choices=("bf16", "fp8", "int8", "int4"), help="with --model: weight dtype")
    p.add_argument("--link-gbs", type=float, help="with --model: link GB/s (default: the chip's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    if (args.load is None) == (args.record is None):
        p.error("give a recorded load file or --record MODEL_DIR --prompts FILE")
    if args.record and args.prompts is None:
        p.error("--record needs --prompts")
    if (args.model is None) != (args.hardware is None):
        p.error("--model and --hardware go together")
    return args


def read_load(path: Path) -> dict[int, list[float]]:
    """{MoE layer: tokens per expert} from JSON or from Prometheus text (moela:routed_expert_tokens)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoelaError(f"{path}: cannot read the load ({e})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = {}
        for labels, value in METRIC.findall(text):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            body.setdefault(tags["layer"], {})[int(tags["expert"])] = float(value)
        body = {layer: [experts[e] for e in sorted(experts)] for layer, experts in body.items()}
    try:
        load = {int(layer): [float(c) for c in counts] for layer, counts in body.items()}
        assert load and all(load.values())
    except (AttributeError, TypeError, ValueError, AssertionError):
        raise MoelaError(f"{path}: no expert load in it (expected JSON {{layer: [tokens per expert]}} or the "
                         "moela:routed_expert_tokens lines of /metrics)") from None
    return load


def record(args: argparse.Namespace) -> dict[int, list[float]]:
    from moela import LLM, SamplingParams

    prompts = [line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    llm = LLM(model=args.record)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    load = {layer: [float(c) for c in counts] for layer, counts in llm.engine.expert_load().items()}
    if args.save_load:
        args.save_load.write_text(json.dumps(load) + "\n", encoding="utf-8")
    return load


def report(load: dict[int, list[float]], plan: Placement) -> dict:
    """Per layer and on average: max/mean load per rank with the experts in order (when they split evenly) and
    with the plan, and the experts the plan copies."""
    in_order = Placement.contiguous(plan.n_experts, plan.n_ranks) if plan.n_experts % plan.n_ranks == 0 else None
    layers = {layer: {"before": imbalance(in_order.rank_loads(layer, counts)) if in_order else None,
                      "after": imbalance(plan.rank_loads(layer, counts)),
                      "copies": [e for e, c in enumerate(plan.copies(layer)) if len(c) > 1]}
              for layer, counts in sorted(load.items())}
    mean = {key: None if key == "before" and in_order is None else sum(v[key] for v in layers.values()) / len(layers)
            for key in ("before", "after")}
    first = next(iter(plan.slots))
    return {"ranks": plan.n_ranks, "redundant": plan.n_ranks * len(plan.slots[first][0]) - plan.n_experts,
            "layers": layers, **mean}


def verdict(args: argparse.Namespace, r: dict) -> dict:
    """The cost model's tensor vs expert parallel decode step with the load balance before and after the plan."""
    from moela.cost import formulas as cost
    from moela.cost.catalog import load_hardware, load_model

    shape, hw = load_model(args.model).shape, load_hardware(args.hardware)
    link = args.link_gbs or hw.link_gbs
    if link is None:
        raise MoelaError(f"{hw.name} has no link figure in the catalog: give --link-gbs")
    out = {}
    for when in ("before", "after"):
        if r[when] is not None:
            steps = cost.parallel_decode(shape, hw, args.batch, args.context, args.dtype, args.ranks, link, r[when])
            out[when] = {mode: step.seconds for mode, step in steps.items()}
    return out


def render(r: dict) -> str:
    lines = [f"max/mean routed load per rank, {r['ranks']} ranks, {r['redundant']} redundant copies",
             f"{'layer':>5}  {'in order':>8}  {'planned':>7}  copied experts"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for layer, v in r["layers"].items():
        lines.append(f"{layer:>5}  {fmt(v['before']):>8}  {fmt(v['after']):>7}  {' '.join(map(str, v['copies']))}")
    lines.append(f"{'mean':>5}  {fmt(r['before']):>8}  {fmt(r['after']):>7}")
    for when, steps in r.get("cost", {}).items():
        pays = "pays" if steps["expert"] < steps["tensor"] else "does not pay"
        lines.append(f"cost model, {when} planning: tensor parallel step {steps['tensor'] * 1e3:.2f} ms, expert parallel "
                     f"{steps['expert'] * 1e3:.2f} ms: expert parallelism {pays}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        load = read_load(args.load) if args.load else record(args)
        n_experts = len(next(iter(load.values())))
        plan = plan_placement(load, n_experts, args.ranks, args.redundant)
        r = report(load, plan)
        if args.model:
            r["cost"] = verdict(args, r)
        if args.out:
            plan.save(args.out)
    except (MoelaError, LookupError) as e:
        print(f"error: {e.args[0] if isinstance(e, LookupError) else e}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
