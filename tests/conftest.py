"""Tiny random DeepSeek checkpoints built with transformers (our numerical oracle) for the tests."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

# One thread: the test models are tiny, and torch spreads even a 4x4 softmax over its threads, whose
# barrier costs milliseconds whenever another process holds a core (measured 23 ms vs 6 us per call).
torch.set_num_threads(1)
if not torch.cuda.is_available():  # the triton backend's kernels run in Triton's interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Commands under test set torch's thread count (--threads auto): later tests get theirs back."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)

BASE = dict(vocab_size=128, hidden_size=48, intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=20, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
            first_k_dense_replace=1, max_position_embeddings=256, hidden_act="silu", bos_token_id=0,
            eos_token_id=1, tie_word_embeddings=False)

VARIANTS = {
    # DeepSeek-V2: query LoRA, softmax scores, group-limited greedy (4 groups, keep 2)
    "v2": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=4.0)),
    # DeepSeek-V2-Lite: no query LoRA, plain greedy
    "v2_lite": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2)),
    # DeepSeek-V3: sigmoid noaux_tc with a random correction bias, 4 groups keep 2, normalized top-k
    "v3": ("deepseek_v3", dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "v3_no_interleave": ("deepseek_v3", dict(n_group=4, topk_group=2, rope_interleave=False)),
    # YaRN factor 40 with mscale != mscale_all_dim, so both the cos/sin factor and the softmax scale move
    "v3_yarn": ("deepseek_v3", dict(n_group=2, topk_group=1, max_position_embeddings=2048, rope_scaling=dict(
        type="yarn", factor=40.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=0.8), rope_theta=10000.0)),
    "v2_yarn": ("deepseek_v2", dict(max_position_embeddings=2048, rope_scaling=dict(
        type="yarn", factor=40.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707))),
    # DeepSeek-V3.2: V3 plus the lightning indexer; top-6 keys, so longer prompts attend sparsely (16 indexer
    # heads: with few heads ReLU leaves exact-zero ties that topk orders arbitrarily)
    "v32": ("deepseek_v32", dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                 index_n_heads=16, index_head_dim=16, index_topk=6)),
    # DeepSeek-V4: every attention kind (a sliding-window layer, CSA every 4 tokens with a top-3 indexer, HCA
    # every 8), a hash-routed first layer, two mHC streams, YaRN on the compressed branches
    "v4": ("deepseek_v4", dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
        q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=48, layer_types=["sliding_attention", "compressed_sparse_attention",
                                               "heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], compress_rates={"compressed_sparse_attention": 4,
                                                                          "heavily_compressed_attention": 8},
        sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3, index_n_heads=16, index_head_dim=16, index_topk=3,
        num_nextn_predict_layers=0, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1))),
}


def hf_class(model_type: str):
    import transformers

    name = {"deepseek_v2": "DeepseekV2", "deepseek_v32": "DeepseekV32", "deepseek_v4": "DeepseekV4"}.get(
        model_type, "DeepseekV3")
    return getattr(transformers, name + "Config"), getattr(transformers, name + "ForCausalLM")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Spread weights so routing and attention are decisive (HF's init gives near-ties)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("tid2eid"):  # V4's hash routing table: distinct experts per token
            n_experts = model.config.n_routed_experts
            p.copy_(torch.stack([torch.randperm(n_experts, generator=g)[: p.shape[1]] for _ in range(p.shape[0])]))
        if not p.is_floating_point() or "inv_freq" in name:
            continue
        noise = torch.randn(p.shape, generator=g)
        if name.endswith(("sinks", "position_bias", "base", "hc_base")):  # V4's, zero in transformers' init
            p.copy_(0.5 * noise)
        elif name.endswith(("scale", "hc_scale")):
            p.copy_(1 + 0.2 * noise)
        elif "norm" in name:
            p.copy_(1 + 0.2 * noise)
        elif "e_score_correction_bias" in name:
            p.copy_(0.3 * noise)
        elif "gate.weight" in name or "embed" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / p.shape[-1] ** 0.5)


def build_hf(variant: str, seed: int = 0, **overrides):
    model_type, extra = VARIANTS[variant]
    config_cls, model_cls = hf_class(model_type)
    cfg = config_cls(**{**({} if model_type == "deepseek_v4" else BASE), **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomize(model, seed)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """variant -> (directory, HF model); each built once per session."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(variant: str) -> tuple[Path, torch.nn.Module]:
        if variant not in cache:
            model = build_hf(variant)
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path)
            cache[variant] = (path, model)
        return cache[variant]

    return get


class Stepper:
    """Teacher-forced steps on the engine's paged latent cache: each sequence appends the given tokens."""

    def __init__(self, model, n_seqs: int, num_blocks: int = 64, block_size: int = 4):
        from moela.engine.cache import BlockManager, CacheLayout
        from moela.engine.runner import Runner
        from moela.engine.sequence import Sequence
        from moela.engine.sampler import SamplingParams

        layout = CacheLayout.fit(model.cache_specs(), model.embed.weight.dtype, block_size)
        slots = n_seqs if layout.fixed_bytes_per_sequence else 0  # V4's window and compressor state
        self.blocks = BlockManager(num_blocks, layout.block_size, enable_prefix_caching=False, num_slots=slots)
        self.runner = Runner(model, layout, num_blocks, slots)
        self.seqs = [Sequence(str(i), 0, [], 0, SamplingParams(), None, None) for i in range(n_seqs)]

    def step(self, new_tokens: list[list[int]]) -> torch.Tensor:
        """Returns the logits of each sequence's last token [n_seqs, vocab]."""
        batch = []
        for seq, toks in zip(self.seqs, new_tokens):
            seq.token_ids += toks
            assert self.blocks.ensure(seq, len(seq.token_ids))
            batch.append((seq, len(toks)))
        logits, _ = self.runner.execute(batch)
        for seq, n in batch:
            seq.num_computed += n
        return logits


def engine_for(path: Path, **kwargs):
    from moela.engine.config import EngineConfig
    from moela.engine.llm import LLMEngine

    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("skip_tokenizer_init", not (path / "tokenizer.json").exists())
    return LLMEngine(EngineConfig(model=path, **kwargs))


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """A tiny random V3 checkpoint with a byte-level BPE tokenizer and chat template."""
    path = tmp_path_factory.mktemp("text_model")
    build_hf("v3", vocab_size=320).save_pretrained(path)
    make_tokenizer(path)
    return path


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization the way DeepSeek-V3 checkpoints store weights."""
    out_dim, in_dim = w.shape
    bo, bi = block
    scale = torch.zeros(math.ceil(out_dim / bo), math.ceil(in_dim / bi))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def quantize_checkpoint(path: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rewrite path's checkpoint with every projection and expert weight in e4m3 with block scales (as
    DeepSeek-V3 stores them; the test dims leave ragged edge blocks); returns its tensors dequantized."""
    from safetensors.torch import load_file, save_file

    from moela.ops.reference import pack_fp8

    tensors, quantized = load_file(path / "model.safetensors"), {}
    for name, t in tensors.items():
        if (name.endswith("proj.weight") or ".experts." in name) and t.dim() == 2:
            q, s = quantize_fp8(t, block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            tensors[name] = pack_fp8(q, s, block, torch.float32)
        else:
            quantized[name] = t
    assert any(t.dtype == torch.float8_e4m3fn and (t.shape[0] % block[0] or t.shape[1] % block[1]) for t in quantized.values())
    save_file(quantized, path / "model.safetensors", metadata={"format": "pt"})
    edit_config(path, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": list(block)})
    return tensors


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
CORPUS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
          "héllo wörld, 你好世界 🙂🚀 naïve café", "for i in range(10):\n    print(i * i)\n"] * 30


def make_tokenizer(path: Path, vocab_size: int = 300, template: str | None = CHAT_TEMPLATE) -> None:
    """A byte-level BPE with DeepSeek's special tokens (ids 0-3) whose post-processor adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": BOS, "special": True}, "eos_token": EOS}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
