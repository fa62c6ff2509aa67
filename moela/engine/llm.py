"""LLMEngine (add_request / step / abort, what the server drives) and LLM, the vLLM-shaped facade.

    llm = LLM(model="path/to/model", dtype="bfloat16", max_num_seqs=32)
    outs = llm.generate(["def fib(n):", "import os"], SamplingParams(temperature=0, max_tokens=64))
    outs = llm.chat([{"role": "user", "content": "hi"}])

    engine = llm.engine
    rid = engine.add_request("hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step():        # RequestOutputs of requests that moved, with delta_text
            print(out.outputs[0].delta_text, end="")
"""

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moela.backends import cpu
from moela.config import DEFAULT_MODEL_DIR, ModelConfig
from moela.engine.cache import BlockManager, cache_bytes_per_token
from moela.engine.outputs import RequestOutput, make_output, postprocess
from moela.engine.runner import Runner
from moela.engine.scheduler import Scheduler, SchedulerConfig
from moela.engine.sequence import Sequence
from moela.loader import load_model
from moela.sampling import SamplingParams, apply_penalties, sample, top_logprobs
from moela.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | Path | None = None  # None: the embedded default model
    dtype: str = "bfloat16"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_memory: int | str | None = None  # bytes ("4GiB" works); default: max_num_seqs full contexts, <= 1/4 of RAM
    block_size: int = 64
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    skip_tokenizer_init: bool = False  # token ids in and out only (no text, no stop strings)
    backend: str = "auto"  # "auto": the fastest backend for the device; "reference": plain PyTorch
    scheduler: SchedulerConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r} is invalid: must be one of {sorted(DTYPES)}")
        if self.backend not in ("auto", "reference"):
            raise ValueError(f"backend = {self.backend!r} is invalid: must be 'auto' or 'reference'")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size = {self.block_size!r} is invalid: must be an integer >= 1")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len = {self.max_model_len!r} is invalid: must be an integer >= 2")
        self.scheduler = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates both
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)


def parse_bytes(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    text = value.strip().lower() if isinstance(value, str) else ""
    for unit, scale in units.items() if isinstance(value, str) else ():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    raise ValueError(f"kv_cache_memory = {value!r} is invalid: use bytes or a size like '4GiB'")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, model: torch.nn.Module | None = None, tokenizer: Tokenizer | None = None):
        path = Path(cfg.model) if cfg.model is not None else DEFAULT_MODEL_DIR
        self.model_cfg = model.cfg if model is not None else ModelConfig.from_pretrained(path)
        self.tokenizer = None if cfg.skip_tokenizer_init else tokenizer or Tokenizer.from_pretrained(path)
        self.model = model or load_model(path, dtype=DTYPES[cfg.dtype], cfg=self.model_cfg)
        if cfg.backend == "auto" and cpu.supported(self.model):
            cpu.prepack(self.model)
            cpu.tune_allocator()
        self.max_model_len = cfg.max_model_len or self.model_cfg.max_position_embeddings
        self.block_size = cfg.block_size
        dtype_bytes = self.model.embed.weight.element_size()
        self.bytes_per_token = cache_bytes_per_token(self.model_cfg.latent_dim, self.model_cfg.num_hidden_layers, dtype_bytes)
        budget = self._cache_budget(cfg)
        num_blocks = budget // (self.bytes_per_token * cfg.block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory = {budget} bytes holds no {cfg.block_size}-token block "
                             f"({self.bytes_per_token * cfg.block_size} bytes each)")
        self.max_cached_tokens = num_blocks * cfg.block_size
        log.info("latent KV cache: %d bytes/token, %d blocks x %d tokens = %d tokens (%.1f MiB)", self.bytes_per_token,
                 num_blocks, cfg.block_size, self.max_cached_tokens, num_blocks * cfg.block_size * self.bytes_per_token / 2**20)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        self.runner = Runner(self.model, num_blocks, cfg.block_size)
        tok_eos = {self.tokenizer.eos_token_id} - {None} if self.tokenizer else set()
        self.eos_ids = set(self.model_cfg.eos_token_ids) | tok_eos
        self.requests: dict[str, Request] = {}
        self.aborted: list[Request] = []
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0}

    def _cache_budget(self, cfg: EngineConfig) -> int:
        if cfg.kv_cache_memory is not None:
            return cfg.kv_cache_memory
        ram = torch.cuda.mem_get_info()[1] if self.model.embed.weight.is_cuda else _physical_memory()
        return min(cfg.max_num_seqs * self.max_model_len * self.bytes_per_token, ram // 4)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("this engine was started with skip_tokenizer_init: give token ids and no stop strings")
        text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        self._check_prompt(ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request_id = {request_id!r} is already in use")
        req = Request(request_id, text, ids)
        for i in range(params.n):
            detok = self.tokenizer.stream() if self.tokenizer else None
            seq = Sequence(request_id, i, list(ids), len(ids), params, params.generator(i), detok,
                           first_sibling=req.seqs[0] if i else None)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.counters["prompt_tokens"] += len(ids)
        return request_id

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_cfg.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not isinstance(t, int) or not 0 <= t < vocab)
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        total = len(ids) + (params.max_tokens or 0)
        if len(ids) >= self.max_model_len or total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_model_len = {self.max_model_len}")
        need = len(ids) + (params.max_tokens or self.max_model_len - len(ids))
        if need > self.max_cached_tokens:
            raise ValueError(f"request needs {need} cached tokens (prompt {len(ids)} + max_tokens) but the whole "
                             f"KV cache holds {self.max_cached_tokens}")

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason, seq.finish_time = "abort", time.perf_counter()
        self.aborted.append(req)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.aborted)

    def step(self) -> list[RequestOutput]:
        outputs = [make_output(req) for req in self.aborted]
        self.aborted = []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        all_rows = {b for b, (seq, _) in enumerate(batch) if seq.params.prompt_logprobs is not None and seq.in_prefill}
        logits, prompt_logits = self.runner.execute(batch, all_rows)
        for b, (seq, n) in enumerate(batch):
            if b in prompt_logits:
                self._prompt_logprobs(seq, n, prompt_logits[b])
            seq.num_computed += n
            self.blocks.commit(seq)
        rows = [b for b, (seq, _) in enumerate(batch) if seq.num_computed == len(seq.token_ids)]
        if rows:
            self._sample([batch[b][0] for b in rows], logits[rows])
        moved = {seq.request_id for seq, _ in batch}
        for rid in moved:
            req = self.requests.get(rid)
            if req is not None:
                outputs.append(make_output(req))
                if all(s.finished for s in req.seqs):
                    del self.requests[rid]
        return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        raw = logits
        logits = apply_penalties(logits.clone(), [s.params for s in seqs], [(s.token_ids[: s.num_prompt_tokens], s.output_ids) for s in seqs])
        for row, seq in enumerate(seqs):
            if seq.num_output < seq.params.min_tokens:
                stops = torch.tensor(sorted(set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos_ids)), dtype=torch.long)
                logits[row, stops[stops < logits.shape[1]]] = float("-inf")
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        n_top = max((s.params.logprobs or 0) for s in seqs)
        want = any(s.params.logprobs is not None for s in seqs)
        chosen, top_ids, top_lp = top_logprobs(raw, tokens, n_top) if want else (None, None, None)
        now = time.perf_counter()
        for row, seq in enumerate(seqs):
            token = int(tokens[row])
            if seq.params.logprobs is not None:
                entry = {token: float(chosen[row])}
                k = seq.params.logprobs
                entry.update({int(i): float(v) for i, v in zip(top_ids[row, :k], top_lp[row, :k])})
                seq.logprobs.append(entry)
            self.counters["generation_tokens"] += 1
            postprocess(seq, token, self.eos_ids, self.max_model_len, now)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)

    def _prompt_logprobs(self, seq: Sequence, n: int, logits: torch.Tensor) -> None:
        start = seq.num_computed
        if start == 0:
            seq.prompt_logprobs = [None]
        k = seq.params.prompt_logprobs
        logp = logits.log_softmax(dim=-1)
        for r in range(n):
            pos = start + r + 1
            if pos >= seq.num_prompt_tokens:
                break
            target = seq.token_ids[pos]
            entry = {target: float(logp[r, target])}
            if k:
                top = logp[r].topk(k)
                entry.update({int(i): float(v) for i, v in zip(top.indices, top.values)})
            seq.prompt_logprobs.append(entry)

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert since start-up, per MoE layer."""
        return {i: layer.ffn.experts.load.tolist() for i, layer in enumerate(self.model.layers) if hasattr(layer.ffn, "experts")}

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "kv_cache_usage": self.blocks.usage(),
                "num_preemptions": s.num_preemptions, "prefix_cache_queries": s.prefix_queries,
                "prefix_cache_hits": s.prefix_hits, **self.counters}


def _physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LLM:
    """vLLM-style offline API over one LLMEngine."""

    def __init__(self, model: str | Path | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in set(ids) - set(done):
                self.engine.abort(rid)
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt), add_special_tokens=False)
                   for c in conversations]
        return self.generate(prompts, sampling_params)
