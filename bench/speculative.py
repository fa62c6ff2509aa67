"""MTP speculative decoding against plain decoding, side by side: tokens/s, the speed-up ratio and
the acceptance rate, at each batch size, on the same engine settings and prompts.

    python bench/speculative.py                                   # the embedded model, batch 1 and 8, k = 1 and 2
    python bench/speculative.py --batches 1 8 --k 1 2 3 --tokens 256 --repeats 5 --threads 2
    python bench/speculative.py --model ./DeepSeek-V3 --dtype bfloat16 --temperature 0.8

Every setting (off, then each k) gets its own engine, loaded once; the timed runs go round the settings
in turn (off, k=1, k=2, off, ...) so a change in the machine's load hits all of them alike, and each
setting reports the median of its runs. A run is one `generate` of `batch` prompts with `--tokens`
new tokens each (ignore_eos), throughput = batch x tokens / its wall time; prefill is included, as a
user sees it. Acceptance rate = accepted / drafted tokens over the timed runs; mean acceptance length =
tokens per verifying step per sequence (1 + accepted / drafts). Writes bench/results/speculative-<date>.json.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from moela import LLM, SamplingParams

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main():", "class Stack:\n    def __init__(self):",
           "def read_config(path):\n    with open(path) as f:", "for i in range(10):", "# Copyright\n\nimport re\n",
           "def quicksort(xs):", "if __name__ == '__main__':"]
SPEC_KEYS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


def timed_run(llm: LLM, batch: int, params: SamplingParams) -> tuple[float, dict]:
    """(tokens/s of one generate over `batch` prompts, the spec counters it added)."""
    before = llm.engine.stats()
    start = time.perf_counter()
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(batch)], params)
    seconds = time.perf_counter() - start
    after = llm.engine.stats()
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
    return batch * params.max_tokens / seconds, {k: after.get(k, 0) - before.get(k, 0) for k in SPEC_KEYS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2], help="num_speculative_tokens values to compare with off")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the median is reported)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--dtype", default="auto", help="weight and cache dtype (auto: as the engine's default)")
    p.add_argument("--backend", default="auto", help="kernels")
    p.add_argument("--threads", default="1", help="CPU threads: a number or auto")
    args = p.parse_args()
    threads = args.threads if args.threads == "auto" else int(args.threads)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.tokens, ignore_eos=True, seed=0)
    rows, ran = [], {}
    for batch in args.batches:
        settings = {0: None} | {k: {"method": "mtp", "num_speculative_tokens": k} for k in args.k}
        llms = {k: LLM(model=args.model, dtype=args.dtype, backend=args.backend, threads=threads, max_num_seqs=batch,
                       speculative_config=s) for k, s in settings.items()}
        engine = llms[0].engine
        ran = {"ran_dtype": str(engine.model.embed.weight.dtype).removeprefix("torch."), "ran_backend": engine.backend.name}
        for llm in llms.values():
            llm.generate(PROMPTS[:batch], SamplingParams(temperature=0, max_tokens=8))  # warm-up
        speeds, counts = {k: [] for k in llms}, {k: dict.fromkeys(SPEC_KEYS, 0) for k in llms}
        for _ in range(args.repeats):
            for k, llm in llms.items():
                speed, added = timed_run(llm, batch, params)
                speeds[k].append(speed)
                counts[k] = {key: counts[k][key] + added[key] for key in SPEC_KEYS}
        base = statistics.median(speeds[0])
        for k in llms:
            c, speed = counts[k], statistics.median(speeds[k])
            rows.append({"batch": batch, "num_speculative_tokens": k, "tokens_per_s": speed, "speedup": speed / base,
                         "acceptance_rate": c[SPEC_KEYS[2]] / c[SPEC_KEYS[1]] if c[SPEC_KEYS[1]] else None,
                         "mean_acceptance_length": 1 + c[SPEC_KEYS[2]] / c[SPEC_KEYS[0]] if c[SPEC_KEYS[0]] else None,
                         "runs_tokens_per_s": speeds[k]})
            r = rows[-1]
            spec = "off" if not k else f"k={k}"
            extra = "" if not k else f", acceptance {r['acceptance_rate']:.2f}, {r['mean_acceptance_length']:.2f} tokens/step"
            print(f"batch {batch:>3} {spec:>4}: {speed:7.1f} tokens/s  {r['speedup']:.2f}x{extra}", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"speculative-{date}.json"
    out.write_text(json.dumps({"command": "python bench/speculative.py " + " ".join(sys.argv[1:]), "date": date,
                               "machine": f"{platform.machine()}, {platform.platform()}", "torch": torch.__version__,
                               "model": args.model or "embedded default model", "dtype": args.dtype,
                               "backend": args.backend, **ran, "threads": args.threads, "tokens": args.tokens,
                               "temperature": args.temperature, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
