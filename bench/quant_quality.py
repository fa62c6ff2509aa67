"""Quality of weight-only quantization on the embedded default model, on the held-out text it was
evaluated on when trained (the files of this Python's standard library that `moela train` holds out).

    python bench/quant_quality.py                       # every held-out window; int8, int4 (g32, g64, g128)
    python bench/quant_quality.py --windows 40          # a quick look
    python bench/quant_quality.py --strip-docstrings    # the held-out files as the embedded model was trained

For each format: held-out perplexity, and the mean per-token KL divergence KL(bf16 || quantized) of
the next-token distributions, both models run in bf16 by one backend (`--backend`; auto: the cpu
backend, as served, where the CPU has bf16 instructions, else the reference).
"""

import argparse
import math
import time

import torch
from tokenizers import Tokenizer

from moela import ops, quantize
from moela.config import DEFAULT_MODEL_DIR
from moela.loader import load_model
from moela.models import StepContext
from moela.train import data

import record  # bench/record.py

FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128")


def heldout_windows(seq_len: int, docstrings: bool) -> torch.Tensor:
    """[N, seq_len + 1] token windows of the held-out stdlib files, tokenized as in training."""
    _, heldout = data.split_files(data.find_files([data.stdlib_dir()]), holdout=0.02)
    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    return data.pack(tok, data.read_texts(heldout, docstrings), seq_len).long()


@torch.no_grad()
def log_probs(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [windows, seq_len, vocab] fp32 of input windows [windows, seq_len]."""
    ctx = StepContext.prefill([inputs.shape[1]] * len(inputs))
    logits = model.logits(model(inputs.flatten(), ctx.positions, ctx)).float()
    return logits.log_softmax(-1).view(*inputs.shape, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=None, help="held-out windows to score (default: all)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (the model was trained on 256)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward")
    p.add_argument("--strip-docstrings", action="store_true", help="score the files without docstrings")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--backend", default="auto", help="kernels of both models (auto: the engine's choice for bf16)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    start = time.perf_counter()
    windows = heldout_windows(args.seq_len, not args.strip_docstrings)[: args.windows]
    backend = ops.select(args.backend, torch.device("cpu"), torch.bfloat16)
    models = {}
    for fmt in ["bf16", *args.formats]:
        quant = None if fmt == "bf16" else fmt
        models[fmt] = load_model(DEFAULT_MODEL_DIR, dtype=torch.bfloat16, hook=quant and quantize.OnLoad(backend, quant))
        quantize.prepare(models[fmt], backend, quant)
    nll, kl = {fmt: 0.0 for fmt in models}, {fmt: 0.0 for fmt in models}
    for a in range(0, len(windows), args.batch):  # sums over tokens, one batch of windows at a time
        inputs, targets = windows[a : a + args.batch, :-1], windows[a : a + args.batch, 1:]
        ref = log_probs(models["bf16"], inputs)
        for fmt, model in models.items():
            lp = ref if fmt == "bf16" else log_probs(model, inputs)
            nll[fmt] += -lp.gather(-1, targets[..., None]).sum().item()
            kl[fmt] += (ref.exp() * (ref - lp)).sum().item()
    tokens = windows[:, 1:].numel()
    results = {fmt: {"perplexity": math.exp(nll[fmt] / tokens), "mean_kl": kl[fmt] / tokens,
                     "weight_bytes": quantize.weight_bytes(model)} for fmt, model in models.items()}
    print(f"{len(windows)} held-out windows x {args.seq_len} tokens")
    print(f"{'format':>10} {'perplexity':>11} {'vs bf16':>8} {'mean KL':>10} {'weights MiB':>12}")
    for fmt, r in results.items():
        r["perplexity_vs_bf16"] = r["perplexity"] / results["bf16"]["perplexity"] - 1
        print(f"{fmt:>10} {r['perplexity']:>11.3f} {r['perplexity_vs_bf16']:>+8.2%} {r['mean_kl']:>10.2e} "
              f"{r['weight_bytes'] / 2**20:>12.2f}")
    record.write(args.out, "quant_quality", None, {"backend": backend.name, "docstrings": not args.strip_docstrings,
                                                    "windows": len(windows), "tokens": tokens,
                                                    "wall_s": time.perf_counter() - start, "results": results})


if __name__ == "__main__":
    main()
