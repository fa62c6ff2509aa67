"""KV-cache bytes: what moela's engine allocates per token (and per sequence) against transformers' cache,
measured on tiny models and computed from the public configs.

    python bench/kv_cache.py            # prints a table, writes bench/results/kv_cache-<date>.json

Measured rows run tiny random DeepSeek-V3, V3.2 and V4 models (fp32) through both engines for 40 and 80
tokens: bytes per token is the growth between the two, the fixed part what is left at zero tokens.
Config rows build each public model on the meta device and size its cache exactly as the engine does
(from the layers' cache specs, bf16); transformers 4.x cached the decompressed K and V of every head.
"""

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from moela.config import ModelConfig
from moela.cost.catalog import load_model as catalog_model
from moela.engine.cache import CacheLayout
from moela.engine.runner import Runner
from moela.engine.sampler import SamplingParams
from moela.engine.sequence import Sequence
from moela.loader import load_model
from moela.models import build_model

PUBLIC = ("deepseek-v2", "deepseek-v3", "deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro")


def public_config(key: str) -> ModelConfig:
    """The catalog's config; V4 entries give layer-type counts, which fix the cache size whatever the order."""
    raw = dict(catalog_model(key).config)
    if counts := raw.pop("layer_type_counts", None):
        raw["layer_types"] = [kind for kind, n in counts.items() for _ in range(n)]
    return ModelConfig.from_dict(raw)


def from_config(key: str) -> dict:
    cfg = public_config(key)
    layout = CacheLayout.fit(build_model(cfg, torch.bfloat16, "meta").cache_specs(), torch.bfloat16, 128)
    row = {"moela": layout.bytes_per_token, "moela_fixed_per_sequence": layout.fixed_bytes_per_sequence}
    if not cfg.v4 and not cfg.indexer:
        row["transformers_4"] = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 2
    return row


def cache_bytes(past) -> int:
    """Every tensor a transformers cache holds, each storage counted once (V4's keys are its values)."""
    seen, total = set(), 0
    for layer in past.layers:
        for value in vars(layer).values():
            for t in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.numel() * t.element_size()
    return total


def ours(model, n: int) -> int:
    layout = CacheLayout(model.cache_specs(), torch.float32, block_size=n)  # one block = exactly the n tokens
    runner = Runner(model, layout, num_blocks=1, num_slots=1)
    ids = list(range(2, 2 + n))
    runner.execute([(Sequence("r", 0, ids, n, SamplingParams(), None, None, block_table=[0], slot=0), n)])
    return sum(c.numel() * c.element_size() for layer in runner.caches for c in layer.values())


def measured(variant: str, tmp: Path, sizes: tuple[int, int] = (40, 80)) -> dict:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import build_hf

    hf = build_hf(variant)
    hf.save_pretrained(tmp)
    model = load_model(tmp, dtype=torch.float32)
    hf_bytes = [cache_bytes(hf(torch.tensor([list(range(2, 2 + n))]), use_cache=True).past_key_values) for n in sizes]
    our_bytes = [ours(model, n) for n in sizes]
    slope = lambda b: (b[1] - b[0]) / (sizes[1] - sizes[0])  # noqa: E731
    return {"moela": slope(our_bytes), "moela_fixed_per_sequence": our_bytes[0] - slope(our_bytes) * sizes[0],
            "transformers_5": slope(hf_bytes), "transformers_5_fixed": hf_bytes[0] - slope(hf_bytes) * sizes[0]}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Takes no options; writes "
                            "bench/results/kv_cache-<date>.json.").parse_args()
    rows = {}
    for variant in ("v3", "v32", "v4"):
        with tempfile.TemporaryDirectory() as tmp:
            rows[f"test model {variant} (fp32, measured)"] = measured(variant, Path(tmp))
    for key in PUBLIC:
        rows[f"{catalog_model(key).name} (bf16, from config)"] = from_config(key)
    print(f"{'model':44} {'moela B/token':>14} {'fixed B/seq':>12} {'transformers 5.x':>17} {'fixed':>10} "
          f"{'transformers 4.x':>17}")
    for name, r in rows.items():
        cells = [r.get(k, float("nan")) for k in ("moela", "moela_fixed_per_sequence", "transformers_5",
                                                  "transformers_5_fixed", "transformers_4")]
        print(f"{name:44} {cells[0]:>14,.1f} {cells[1]:>12,.0f} {cells[2]:>17,.1f} {cells[3]:>10,.0f} {cells[4]:>17,.0f}")
    date = datetime.date.today().isoformat()
    out = Path(__file__).parent / "results" / f"kv_cache-{date}.json"
    out.write_text(json.dumps({"command": "python bench/kv_cache.py", "date": date,
                               "machine": platform.machine() + " " + platform.processor(), "bytes_per_token": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
