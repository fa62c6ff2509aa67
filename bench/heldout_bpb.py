"""Held-out bits per byte of one or more models on the same held-out files, so models with different
tokenizers compare fairly.

    python bench/heldout_bpb.py                                   # the embedded default model
    python bench/heldout_bpb.py moela/assets/default-model /tmp/old-default-model --name new --name old

The held-out files are those `moela train` holds out of its default corpus (this Python's standard
library `*.py`, 2% of the files chosen by a hash of their path), as they are and without their
docstrings (as `moela train --strip-docstrings` reads them). Each model reads them as training
packed them (`<bos> text <eos>` back to back, windows of --seq-len tokens overlapping by one, the
tail window padded), in fp32; bits per byte = the summed next-token loss in bits over the UTF-8
bytes of the files. Writes bench/results/heldout-bpb-<date>.json.
"""

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from moela.config import DEFAULT_MODEL_DIR
from moela.loader import load_model
from moela.models import StepContext
from moela.tokenizer import Tokenizer
from moela.train import data


def stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All held-out files as one token stream: <bos> text <eos> for each."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = []
    for text in texts:
        ids += [bos, *tok.encode(text, add_special_tokens=False), eos]
    return torch.tensor(ids)


@torch.inference_mode()
def nll_bits(path: Path, texts: list[str], seq_len: int, batch: int) -> tuple[float, int]:
    """(summed loss in bits of every token after the first, how many tokens) for the model at path."""
    model, tok = load_model(path, dtype=torch.float32), Tokenizer.from_pretrained(path)
    ids = stream(tok, texts)
    n = -(-(len(ids) - 1) // seq_len)  # windows, the last one padded
    padded = torch.cat([ids, ids.new_zeros(n * seq_len + 1 - len(ids))])
    windows = padded.unfold(0, seq_len + 1, seq_len)  # [n, S + 1]
    total = 0.0
    for i in range(0, n, batch):
        w = windows[i : i + batch]
        ctx = StepContext.prefill([seq_len] * len(w))
        logits = model.logits(model(w[:, :-1].flatten(), ctx.positions, ctx)).float()
        loss = F.cross_entropy(logits, w[:, 1:].flatten(), reduction="none").view(len(w), seq_len)
        valid = (torch.arange(i, i + len(w))[:, None] * seq_len + torch.arange(1, seq_len + 1)) < len(ids)
        total += loss[valid].sum().item()
    return total / math.log(2), len(ids) - 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, default=[DEFAULT_MODEL_DIR], help="model directories")
    p.add_argument("--name", action="append", default=None, help="a label per model (default: its path)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--batch", type=int, default=16, help="windows per forward")
    p.add_argument("--holdout", type=float, default=0.02, help="as `moela train --holdout`")
    args = p.parse_args()
    names = args.name or [str(m) for m in args.models]
    if len(names) != len(args.models):
        p.error(f"{len(names)} --name for {len(args.models)} models")
    torch.manual_seed(0)
    _, files = data.split_files(data.find_files([data.stdlib_dir()]), args.holdout)
    rows, sizes = [], {}
    for text_kind, keep in (("files", True), ("files without docstrings", False)):
        texts = data.read_texts(files, docstrings=keep)
        n_bytes = sizes[text_kind] = sum(len(t.encode("utf-8")) for t in texts)
        print(f"{len(texts)} held-out files as {text_kind}: {n_bytes:,} bytes", flush=True)
        for name, path in zip(names, args.models):
            bits, n_tokens = nll_bits(path, texts, args.seq_len, args.batch)
            rows.append({"model": name, "path": str(path), "text": text_kind, "bits_per_byte": bits / n_bytes,
                         "tokens": n_tokens, "bytes_per_token": n_bytes / n_tokens,
                         "nats_per_token": bits * math.log(2) / n_tokens})
            print(f"{name} on {text_kind}: {bits / n_bytes:.4f} bits/byte ({n_tokens:,} tokens, "
                  f"{rows[-1]['nats_per_token']:.3f} nats/token)", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"heldout-bpb-{date}.json"
    out.write_text(json.dumps({"command": "python bench/heldout_bpb.py " + " ".join(sys.argv[1:]), "date": date,
                               "machine": f"{platform.machine()}, {platform.platform()}", "python": platform.python_version(),
                               "heldout_files": len(texts), "heldout_bytes": sizes, "seq_len": args.seq_len,
                               "heldout_file_names": [f.rel for f in files],
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
