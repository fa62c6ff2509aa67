"""The `moela` command: generate | serve | bench | cost | train | plan-experts | export | convert.

    moela generate "def fibonacci(n):"                   # the embedded default model
    moela generate --model DIR --chat --max-tokens 64 "Hello"
    moela cost deepseek-v3 --hardware h100               # see moela/cost/cli.py
    moela train ...                                      # see moela/train/cli.py
    moela bench --shape bench-1b                         # see moela/bench.py
    moela export onnx DIR OUT                            # see moela/export.py
    moela convert --to mindformers SRC DST               # see moela/convert.py

Bad input (a missing path, an unsupported model, a corrupt checkpoint) prints one line and exits 1.
"""

import argparse
import importlib
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version

from moela.config import RUN_DTYPES, HelpFormatter

from moela.engine.config import add_engine_args
from moela.errors import MoelaError


def moela_version() -> str:
    try:
        return version("moela")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


SUBCOMMANDS = {"cost": "moela.cost.cli", "bench": "moela.bench", "train": "moela.train.cli", "serve": "moela.server.cli",
               "plan-experts": "moela.placement_cli", "export": "moela.export", "convert": "moela.convert"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:  # commands with parsers of their own, imported only when run
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return run_generate(args)
    except (MoelaError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    """`moela` and `moela generate` (the other commands have parsers of their own)."""
    parser = argparse.ArgumentParser(prog="moela", description="Run DeepSeek-family models (MLA + DeepSeekMoE).")
    parser.add_argument("--version", action="version", version=f"moela {moela_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cost", help="memory planner and cost model (moela cost --help)")
    sub.add_parser("train", help="train a model (moela train --help)")
    sub.add_parser("serve", help="OpenAI-compatible server (moela serve --help)")
    sub.add_parser("bench", help="throughput vs transformers and the bandwidth roofline (moela bench --help)")
    sub.add_parser("plan-experts", help="expert placement for expert parallelism from recorded load (moela plan-experts --help)")
    sub.add_parser("export", help="ONNX graphs for ONNX Runtime (moela export onnx --help)")
    sub.add_parser("convert", help="checkpoints between HF and mindformers names (moela convert --help)")
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed as it decodes",
                         formatter_class=HelpFormatter)
    gen.add_argument("prompt", help="the text to continue (or, with --chat, the user's message)")
    gen.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="at most this many new tokens (fewer if the context ends)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (llama.cpp samples at 0.8 too)")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the top tokens up to this mass")
    gen.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; -1 = no limit")
    gen.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off")
    gen.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    gen.add_argument("--dtype", choices=RUN_DTYPES, default="auto",
                     help="weight and cache dtype; auto: bfloat16 where the device computes in it natively, else float32")
    add_engine_args(gen)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from moela.config import ModelConfig, model_dir

    from moela.engine.config import EngineConfig, engine_args
    from moela.engine.llm import LLMEngine
    from moela.engine.ranks import follow_forever, is_follower
    from moela.engine.sampler import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)
    path = model_dir(args.model)
    cfg = EngineConfig(model=path, dtype=args.dtype, max_num_seqs=1, **engine_args(args))
    cfg.check_model(ModelConfig.from_pretrained(path))  # an unsupported model fails before anything else is read
    if is_follower(cfg):  # under torchrun: ranks > 0 run rank 0's steps
        follow_forever(cfg)
        return 0
    engine = LLMEngine(cfg)
    tok = engine.tokenizer
    if args.chat:
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]), add_special_tokens=False)
    else:
        prompt = tok.encode(args.prompt)
    max_tokens = min(args.max_tokens, engine.max_model_len - len(prompt))
    if max_tokens < 1:
        raise MoelaError(f"the prompt ({len(prompt)} tokens) fills the model's context ({engine.max_model_len})")
    if max_tokens < args.max_tokens:
        print(f"warning: --max-tokens {args.max_tokens}: at most {max_tokens} new tokens fit after the {len(prompt)}-token "
              f"prompt in the model's {engine.max_model_len}-token context", file=sys.stderr)
    params.max_tokens = max_tokens
    start = time.perf_counter()
    engine.add_request(prompt, params)
    out = None
    while engine.has_unfinished():
        for out in engine.step():
            print(out.outputs[0].delta_text, end="", flush=True)
    print(flush=True)
    n, m = len(out.outputs[0].token_ids), out.metrics
    decode = f", decode {(n - 1) / m.decode_time:.1f} tokens/s" if n > 1 and m.decode_time else ""
    print(f"[{n} tokens in {time.perf_counter() - start:.2f}s, first token after {m.time_to_first_token:.2f}s{decode};"
          f" prompt {len(prompt)} tokens; {torch.get_num_threads()} CPU threads]", file=sys.stderr)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
