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
import math
import time
import uuid
from pathlib import Path

import torch

from moela import ops, quantize, threads
from moela.config import ModelConfig, model_dir
from moela.engine.config import EngineConfig
from moela.engine.cache import BlockManager, CacheLayout
from moela.engine.graphs import graph_sizes
from moela.engine.guided import Guides
from moela.engine.onnx_runner import OnnxRunner, read_manifest
from moela.engine.outputs import RequestOutput, make_output, postprocess
from moela.engine.ranks import Ranks, follow_forever, is_follower
from moela.engine.runner import Runner
from moela.engine.sampler import SamplingParams, apply_penalties, sample, top_logprobs
from moela.engine.scheduler import Scheduler
from moela.engine.sequence import Request, Sequence
from moela.engine.speculative import Speculator
from moela.loader import load_model
from moela.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, model: torch.nn.Module | None = None, tokenizer: Tokenizer | None = None):
        path = model_dir(cfg.model)
        if model is not None and cfg.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 loads each rank's slices from a model directory, not a built model")
        self.ranks = Ranks.start(cfg) if cfg.tensor_parallel_size > 1 else None  # docs/distributed.md
        cfg = self.ranks.local_config(cfg) if self.ranks else cfg
        self.threads = threads.apply(cfg.threads)
        self.model_cfg = model.cfg if model is not None else ModelConfig.from_pretrained(path)
        self.max_model_len = cfg.check_model(self.model_cfg)
        self.tokenizer = None if cfg.skip_tokenizer_init else tokenizer or Tokenizer.from_pretrained(path)
        if cfg.runtime == "onnx":  # graphs from `moela export onnx`: no torch model; sampling on the host
            self.device, self.backend, self.model, self.speculator = torch.device("cpu"), None, None, None
            specs, dtype = read_manifest(path)
        else:
            self.device = model.embed.weight.device if model is not None else torch.device(cfg.device)
            dtype = model.embed.weight.dtype if model is not None else cfg.torch_dtype
            self.backend = ops.select(cfg.backend, self.device, dtype)  # before loading: one that cannot run here fails fast
            quant = cfg.quant_format
            if quant and not ops.quantizes(self.backend):
                raise ops.BackendUnavailable(f"quantization = {cfg.quantization!r}: backend {self.backend.name!r} has no "
                                             "quantized kernels (the cpu and reference backends have)")
            hook = quantize.OnLoad(self.backend, quant) if quant else None
            shard = self.ranks.shard(cfg, self.model_cfg) if self.ranks else None
            self.model = model or load_model(path, dtype=dtype, device=self.device, cfg=self.model_cfg, keep_fp8=True,
                                             hook=hook, shard=shard)
            quantize.prepare(self.model, self.backend, quant)
            if shard:
                shard.bind(self.model)
            log.info("weights: %.1f MiB (%s)", quantize.weight_bytes(self.model) / 2**20, quant or str(dtype).removeprefix("torch."))
            spec = cfg.speculative_config
            self.speculator = Speculator(spec, self.model, path, self.backend) if spec else None
            specs = self.model.cache_specs() + (self.speculator.cache_specs() if self.speculator else [])
        self.layout = layout = CacheLayout.fit(specs, dtype, cfg.block_size)
        if layout.block_size != cfg.block_size:
            log.info("block_size %d -> %d: this model's compressed caches keep one entry per %d tokens", cfg.block_size,
                     layout.block_size, math.lcm(*(s.tokens_per_entry for s in layout.all_specs())))
        self.bytes_per_token = layout.bytes_per_token  # paged kinds, all layers
        num_slots = cfg.max_num_seqs if layout.fixed_bytes_per_sequence else 0
        budget = self._cache_budget(cfg, layout)
        num_blocks = layout.num_blocks(budget, num_slots)
        if self.ranks:
            num_blocks = self.ranks.agree(num_blocks)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory = {budget} bytes holds no {layout.block_size}-token block "
                             f"({layout.bytes_per_block} bytes each, after {num_slots} sequences' fixed "
                             f"{layout.fixed_bytes_per_sequence} bytes)")
        self.max_cached_tokens = num_blocks * layout.block_size
        graphs = cfg.cuda_graphs and not num_slots and self.speculator is None
        if cfg.runtime == "onnx":
            self.runner = OnnxRunner(path, layout, num_blocks, cfg.provider, num_slots)
            running = f"ONNX Runtime ({self.runner.provider}, {str(dtype).removeprefix('torch.')})"
        else:
            self.runner = Runner(self.model, layout, num_blocks + graphs, num_slots, self.backend)  # + the graphs' scratch block
            running = f"backend {self.backend.name} on {self.device}"
        log.info("%s; KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)%s", running, num_blocks, layout.block_size,
                 self.max_cached_tokens, num_blocks * layout.bytes_per_block / 2**20,
                 "".join(f"\n  {line}" for line in layout.describe()))
        prefix_caching = cfg.enable_prefix_caching and not num_slots
        if cfg.enable_prefix_caching and not prefix_caching:
            log.info("prefix caching is off: this model keeps per-sequence state (%s) that cached blocks do not hold",
                     ", ".join(sorted({s.kind for s in layout.all_specs() if not s.paged})))
        self.blocks = BlockManager(num_blocks, layout.block_size, prefix_caching, num_slots)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        if cfg.cuda_graphs and not graphs:
            log.info("CUDA graphs are off: %s", "speculative steps run eagerly" if self.speculator else
                     "this model keeps per-sequence state that padding rows would need too")
        if graphs:
            self.runner.capture_graphs(graph_sizes(cfg.max_num_seqs), math.ceil(self.max_model_len / cfg.block_size), num_blocks)
        if self.speculator:
            self.speculator.attach_cache(self.runner.caches[len(self.model.layers) :])
        tok_eos = {self.tokenizer.eos_token_id} - {None} if self.tokenizer else set()
        self.eos_ids = set(self.model_cfg.eos_token_ids) | tok_eos
        self.guides = Guides(self.tokenizer.tok.to_str() if self.tokenizer else None, self.model_cfg.vocab_size,
                             self.eos_ids, self.device)
        self.requests: dict[str, Request] = {}
        self.aborted: list[Request] = []
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0}
        if self.ranks:
            self.ranks.lead(self)

    def _cache_budget(self, cfg: EngineConfig, layout: CacheLayout) -> int:
        """kv_cache_memory, or max_num_seqs whole contexts in whole blocks, at most 1/4 of the device's memory."""
        if cfg.kv_cache_memory is not None:
            return cfg.kv_cache_memory
        per_seq = math.ceil(self.max_model_len / layout.block_size) * layout.bytes_per_block + layout.fixed_bytes_per_sequence
        return min(cfg.max_num_seqs * per_seq, ops.device_memory(self.device) // 4)

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
        guides = self.guides.start(params, params.n)
        for i in range(params.n):
            detok = self.tokenizer.stream(params.skip_special_tokens) if self.tokenizer else None
            seq = Sequence(request_id, i, list(ids), len(ids), params, params.generator(i, self.device), detok,
                           first_sibling=req.seqs[0] if i else None, guide=guides[i])
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
        if self.threads is not None:
            self.threads.tick()
        outputs = [make_output(req) for req in self.aborted]
        self.aborted = []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        if self.speculator is not None:
            self.speculator.step(self, batch)
        else:
            self._execute(batch)
        moved = {seq.request_id for seq, _ in batch}
        for rid in moved:
            req = self.requests.get(rid)
            if req is not None:
                outputs.append(make_output(req))
                if all(s.finished for s in req.seqs):
                    del self.requests[rid]
        return outputs

    def _execute(self, batch: list[tuple[Sequence, int]]) -> None:
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

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        raw = logits
        logits = apply_penalties(logits.clone(), [s.params for s in seqs], [(s.token_ids[: s.num_prompt_tokens], s.output_ids) for s in seqs])
        for row, seq in enumerate(seqs):
            if seq.num_output < seq.params.min_tokens:
                stops = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos_ids)
                logits[row, sorted(t for t in stops if t < logits.shape[1])] = float("-inf")
        logits = self.guides.apply(logits, [s.guide for s in seqs])
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        want = [s.params.logprobs for s in seqs]
        if any(k is not None for k in want):  # to the host once: the chosen and the top logprobs of every row
            chosen, top_ids, top_lp = (t.tolist() for t in top_logprobs(raw, tokens, max(k or 0 for k in want)))
        now = time.perf_counter()
        for row, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            if (k := want[row]) is not None:
                seq.logprobs.append({token: chosen[row]} | dict(zip(top_ids[row][:k], top_lp[row][:k])))
            self.counters["generation_tokens"] += 1
            postprocess(seq, token, self.eos_ids, self.max_model_len, now, done=self.guides.accept(seq.guide, token))
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)

    def _prompt_logprobs(self, seq: Sequence, n: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk predicts (each row predicts the next prompt token)."""
        start = seq.num_computed
        if start == 0:
            seq.prompt_logprobs = [None]
        rows = min(n, seq.num_prompt_tokens - start - 1)
        if rows <= 0:
            return
        logp = logits[:rows].log_softmax(dim=-1)
        targets = seq.token_ids[start + 1 : start + 1 + rows]
        chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        top = [t.tolist() for t in logp.topk(k, dim=-1)] if k else None
        for r, target in enumerate(targets):
            entry = {target: chosen[r]}
            if top:
                entry.update(zip(top[1][r], top[0][r]))
            seq.prompt_logprobs.append(entry)

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert since start-up, per MoE layer."""
        if self.model is None:  # ONNX graphs keep no counters
            return {}
        return {i: layer.ffn.experts.load.tolist() for i, layer in enumerate(self.model.layers) if hasattr(layer.ffn, "experts")}

    def close(self) -> None:
        """Stop the other ranks of a parallel engine (also done when the engine is collected or at exit)."""
        if self.ranks:
            self.ranks.shutdown()

    def stats(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "kv_cache_usage": self.blocks.usage(),
                "num_preemptions": s.num_preemptions, "prefix_cache_queries": s.prefix_queries,
                "prefix_cache_hits": s.prefix_hits, **self.counters, **(self.speculator.stats() if self.speculator else {})}


class LLM:
    """vLLM-style offline API over one LLMEngine."""

    def __init__(self, model: str | Path | None = None, **kwargs):
        cfg = EngineConfig(model=model, **kwargs)
        if is_follower(cfg):  # under torchrun, ranks > 0 follow rank 0 and exit with it
            follow_forever(cfg)
            raise SystemExit(0)
        self.engine = LLMEngine(cfg)

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
