"""The `moela` command: generate | cost | train.

    moela generate "def fibonacci(n):"                   # the embedded default model
    moela generate --model DIR --chat --max-tokens 64 "Hello"
    moela cost deepseek-v3 --hardware h100               # see moela/cost_cli.py
    moela train ...                                      # see moela/train/cli.py

Bad input (a missing path, an unsupported model, a corrupt checkpoint) prints one line and exits 1.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from moela.errors import MoelaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "cost":
        from moela.cost_cli import main as cost_main
        return cost_main(argv[1:])
    if argv and argv[0] == "train":
        from moela.train.cli import main as train_main
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="moela", description="Run DeepSeek-family models (MLA + DeepSeekMoE).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cost", help="memory planner and cost model (moela cost --help)")
    sub.add_parser("train", help="train a model (moela train --help)")
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed as it decodes")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return run_generate(args)
    except (MoelaError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_generate(args: argparse.Namespace) -> int:
    from moela.config import ModelConfig
    from moela.generate import generate
    from moela.loader import load_model
    from moela.sampling import SamplingParams
    from moela.tokenizer import Tokenizer

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    path = Path(args.model) if args.model else DEFAULT_MODEL
    if not path.exists():
        raise MoelaError(f"{path}: no such model directory")
    cfg = ModelConfig.from_pretrained(path)  # an unsupported model fails before anything is read
    tok = Tokenizer.from_pretrained(path)
    model = load_model(path, dtype=DTYPES[args.dtype], cfg=cfg)
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
    else:
        prompt = tok.encode(args.prompt)
    if not prompt:
        raise MoelaError("the prompt encodes to no tokens")
    eos = tuple(model.cfg.eos_token_ids) + ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    stream = tok.stream()
    count, start = 0, time.perf_counter()

    def on_token(_: int, token: int) -> None:
        nonlocal count
        count += 1
        print(stream.step(token), end="", flush=True)

    generate(model, [prompt], params, eos_ids=eos, on_token=on_token)
    elapsed = time.perf_counter() - start
    print(stream.flush(), flush=True)
    print(f"[{count} tokens in {elapsed:.2f}s: {count / elapsed:.1f} tokens/s, prompt {len(prompt)} tokens]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
