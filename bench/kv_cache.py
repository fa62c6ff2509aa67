"""KV-cache bytes per token: moela's paged latent cache vs transformers' cache, measured and from configs.

    python bench/kv_cache.py            # prints a table, writes bench/results/kv_cache-<date>.json

Measured rows run a tiny random DeepSeek-V3 model through both engines for N tokens and divide the
bytes each cache holds by N. Config rows apply the same per-token layout to the public DeepSeek-V2
and V3 configs (bf16): moela and transformers 5.x keep [c_KV | k_pe] = kv_lora_rank + qk_rope_head_dim
values per token per layer; transformers 4.x kept the decompressed K and V of every head.
"""

import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from moela.config import ModelConfig
from moela.cost import formulas as cost
from moela.cost.catalog import shape_from_model_config
from moela.engine.cache import CacheLayout
from moela.engine.runner import Runner
from moela.engine.sequence import Sequence
from moela.engine.sampler import SamplingParams
from moela.loader import load_model

PUBLIC = {  # the fields of the public config.json files that set the cache size
    "DeepSeek-V2": dict(model_type="deepseek_v2", num_hidden_layers=60, num_attention_heads=128, hidden_size=5120),
    "DeepSeek-V3": dict(model_type="deepseek_v3", num_hidden_layers=61, num_attention_heads=128, hidden_size=7168),
}
HEADS = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280,
             intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_group=8, topk_group=4,
             num_experts_per_tok=8, first_k_dense_replace=1)


def per_token(cfg: ModelConfig) -> dict[str, float]:
    """bf16 bytes per token: the latent (moela's cost model) and transformers 4.x's decompressed K and V."""
    latent = cost.cache_bytes_per_token(shape_from_model_config(cfg), "bf16")
    h = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return {"moela": latent, "transformers_5": latent, "transformers_4": h * cfg.num_hidden_layers * 2}


def measured(tmp: Path, n_tokens: int = 40) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import build_hf

    hf = build_hf("v3")
    hf.save_pretrained(tmp)
    ids = list(range(2, 2 + n_tokens))
    past = hf(torch.tensor([ids]), use_cache=True).past_key_values
    hf_bytes = sum(t.numel() * t.element_size() for layer in past.layers for t in (layer.keys, layer.values))
    model = load_model(tmp, dtype=torch.float32)
    layout = CacheLayout(model.cache_specs(), torch.float32, block_size=n_tokens)  # one block = exactly the n tokens
    runner = Runner(model, layout, num_blocks=1)
    seq = Sequence("r", 0, ids, n_tokens, SamplingParams(), None, None, block_table=[0])
    runner.execute([(seq, n_tokens)])
    ours = sum(c.numel() * c.element_size() for layer in runner.caches for c in layer.values())
    return {"moela": ours / n_tokens, "transformers_5": hf_bytes / n_tokens}


def main() -> None:
    import argparse
    import tempfile

    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Takes no options; writes "
                            "bench/results/kv_cache-<date>.json.").parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["test model v3 (fp32, measured)"] = measured(Path(tmp))
    for name, fields in PUBLIC.items():
        cfg = ModelConfig.from_dict({**HEADS, **fields})
        rows[f"{name} (bf16, from config)"] = per_token(cfg)
    print(f"{'model':36} {'moela':>10} {'transformers 5.x':>17} {'transformers 4.x':>17}")
    for name, r in rows.items():
        print(f"{name:36} {r['moela']:>10,.0f} {r['transformers_5']:>17,.0f} {r.get('transformers_4', float('nan')):>17,.0f}")
    out = Path(__file__).parent / "results" / f"kv_cache-{datetime.date.today()}.json"
    out.write_text(json.dumps({"command": "python bench/kv_cache.py", "date": str(datetime.date.today()),
                               "machine": platform.machine() + " " + platform.processor(), "bytes_per_token": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
