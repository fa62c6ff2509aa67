"""MTP speculative decoding: the checkpoint's multi-token-prediction layer drafts tokens, the model
verifies them all in its next step, and rejection sampling keeps exactly the model's distribution.

    llm = LLM(speculative_config={"method": "mtp", "num_speculative_tokens": 2})   # --speculative-config on the CLIs
    stats = llm.engine.stats()   # spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens(_per_pos)

One engine step with speculation (Speculator.step, in place of the plain forward and sample):

1. Verify. A decoding sequence is scheduled with 1 + m tokens, its last sampled token and the m drafts
   of the previous step (seq.spec_tokens), as one chunk over the paged cache like a prefill chunk.
   Row j's logits give the model's distribution p_j of the token after draft j (temperature, top-k/p,
   min-p, penalties with the drafts before it as history). Draft j is kept with probability
   min(1, p_j(d_j) / q_j(d_j)), q_j being the distribution it was drawn from (greedy: when it is p_j's
   argmax); the first rejected row draws from (p_j - q_j)+ instead, and if every draft is kept the last
   row draws a bonus token. So a step yields 1 to m + 1 tokens, distributed as the model alone would
   give them. Rollback is by length: num_computed moves to the kept tokens, the rejected ones' cache
   entries lie past it and are overwritten later, and blocks past what the next step needs are freed.
2. Draft. The MTP module reads, for every position p that became valid in this step, the model's final
   hidden state h_p and the token t_{p+1} after it (its MLA latents go to a cache layer of its own, in
   the same blocks); its output at the last position predicts the token after the one just sampled:
   draft 1. Drafts 2..k feed the MTP's own output and the previous draft back through it, one token
   per sequence per pass.

Prompts are prefilled as without speculation, the MTP reading along chunk by chunk. A prefix-cache hit
brings the MTP entries of the shared blocks along; the one at a block's last position was built with
the next token of the request that computed it, which may cost an acceptance, never a changed output.
Models with per-sequence cache state cannot roll back by length (V4's window), so only the V3
architecture (V3, R1, Kimi K2) with an MTP layer in its checkpoint is accepted.
"""

import time
from pathlib import Path

import torch

from moela import ops, quantize
from moela.engine.config import SpeculativeConfig
from moela.engine.outputs import postprocess
from moela.engine.sampler import apply_penalties, probabilities, top_logprobs
from moela.engine.sequence import Sequence
from moela.errors import ConfigError
from moela.loader import load_mtp
from moela.models.mtp import build_mtp

MTP_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, model: torch.nn.Module, path: Path, backend: ops.Backend):
        mc = model.cfg
        if mc.model_type not in MTP_MODEL_TYPES:
            raise ConfigError(f"{path}: speculative_config method 'mtp' supports {', '.join(MTP_MODEL_TYPES)} checkpoints; "
                              f"this one is {mc.model_type}")
        if not mc.num_nextn_predict_layers:
            raise ConfigError(f"{path}: speculative_config method 'mtp' needs the checkpoint's MTP layer, but config.json "
                              "has num_nextn_predict_layers = 0")
        self.k = cfg.num_speculative_tokens
        self.mtp = build_mtp(mc, model.embed.weight.dtype, model.embed.weight.device)
        load_mtp(self.mtp, path, mc)  # a checkpoint without the layer's tensors fails here, naming the first one
        quantize.prepare(self.mtp, backend)
        self.counters = {"spec_decode_num_drafts": 0, "spec_decode_num_draft_tokens": 0, "spec_decode_num_accepted_tokens": 0}
        self.accepted_per_pos = [0] * self.k

    def cache_specs(self) -> list:
        return self.mtp.cache_specs()

    def attach_cache(self, caches: list[dict[str, torch.Tensor]]) -> None:
        self.mtp.attach_cache(caches)

    def stats(self) -> dict:
        return self.counters | {"spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos)}

    @torch.inference_mode()
    def step(self, engine, batch: list[tuple[Sequence, int]]) -> None:
        """One forward of the model over the batch, verification of the drafts in it, then new drafts."""
        hidden, ctx = engine.runner.forward(batch)
        logits = engine.model.logits
        starts = [seq.num_computed for seq, _ in batch]
        drafts = [seq.spec_tokens[: max(0, n - (len(seq.token_ids) - seq.num_computed))] for seq, n in batch]
        for b, (seq, n) in enumerate(batch):
            if seq.params.prompt_logprobs is not None and seq.in_prefill:
                engine._prompt_logprobs(seq, n, logits(hidden[ctx.q_starts[b] : ctx.q_starts[b + 1]]).float())
        valid = {}  # b -> how many of its scheduled positions hold kept tokens
        for b, (seq, n) in enumerate(batch):
            if not drafts[b]:
                seq.num_computed += n
                engine.blocks.commit(seq)
                valid[b] = n
        ends = [b for b in valid if batch[b][0].num_computed == len(batch[b][0].token_ids)]
        if ends:
            engine._sample([batch[b][0] for b in ends], logits(hidden[[ctx.q_starts[b + 1] - 1 for b in ends]]).float())
        verify = [b for b in range(len(batch)) if drafts[b]]
        if verify:
            kept = self.verify(engine, [batch[b][0] for b in verify], [drafts[b] for b in verify], hidden,
                               [ctx.q_starts[b] for b in verify])
            valid |= dict(zip(verify, kept))
        live = [b for b in range(len(batch)) if not batch[b][0].finished]
        if live:
            rows = [ctx.q_starts[b] + j for b in live for j in range(valid[b])]
            self.propose(engine, [(batch[b][0], valid[b]) for b in live], [starts[b] for b in live], hidden[rows])

    def verify(self, engine, seqs: list[Sequence], drafts: list[list[int]], hidden: torch.Tensor,
               row_starts: list[int]) -> list[int]:
        """Keep each sequence's accepted drafts and one more token; return its positions now valid (kept + 1)."""
        rows = [r + j for r, d in zip(row_starts, drafts) for j in range(len(d) + 1)]
        raw = engine.model.logits(hidden[rows]).float()  # [R, V]: row j of a sequence predicts what follows draft j
        logits = self.target_logits(engine, seqs, drafts, raw)
        p = probabilities(logits, [seq.params for seq, d in zip(seqs, drafts) for _ in range(len(d) + 1)])
        accept, emit, r = [], [], 0
        for seq, d in zip(seqs, drafts):
            a, e = rejection_sample(p[r : r + len(d) + 1], d, seq.spec_probs, seq.generator, seq.params.greedy)
            accept.append(a)
            emit.append(e)
            r += len(d) + 1
        accept, emit = torch.cat(accept).tolist(), torch.cat(emit).tolist()  # one copy to the host for the batch
        kept, now, fa, row = [], time.perf_counter(), 0, 0
        for seq, d in zip(seqs, drafts):
            m = len(d)
            a = next((j for j in range(m) if not accept[fa + j]), m)
            self.counters["spec_decode_num_drafts"] += 1
            self.counters["spec_decode_num_draft_tokens"] += m
            self.counters["spec_decode_num_accepted_tokens"] += a
            for j in range(a):
                self.accepted_per_pos[j] += 1
            self.emit(engine, seq, d[:a] + [emit[row + a]], raw[row : row + a + 1], now)
            kept.append(a + 1)
            fa, row = fa + m, row + m + 1
        return kept

    def emit(self, engine, seq: Sequence, tokens: list[int], raw: torch.Tensor, now: float) -> None:
        """Append tokens (stopping where the sequence finishes), move num_computed past the kept ones."""
        start, k = seq.num_computed, seq.params.logprobs
        if k is not None:
            chosen, top_ids, top_lp = (t.tolist() for t in top_logprobs(raw, torch.tensor(tokens, device=raw.device), k))
        for i, token in enumerate(tokens):
            if k is not None:
                seq.logprobs.append({token: chosen[i]} | dict(zip(top_ids[i][:k], top_lp[i][:k])))
            engine.counters["generation_tokens"] += 1
            postprocess(seq, token, engine.eos_ids, engine.max_model_len, now)
            if seq.finish_reason is not None:
                break
        seq.num_computed = min(start + len(tokens), len(seq.token_ids))  # the last token is computed next step
        engine.blocks.commit(seq)
        if seq.finish_reason is not None:
            engine.scheduler.finish(seq)

    @staticmethod
    def target_logits(engine, seqs: list[Sequence], drafts: list[list[int]], raw: torch.Tensor) -> torch.Tensor:
        """raw [R, V] with each row's penalties (its drafts so far count as output) and min_tokens applied."""
        params, histories, stop_rows = [], [], []
        for seq, d in zip(seqs, drafts):
            p, prompt = seq.params, seq.token_ids[: seq.num_prompt_tokens]
            stops = sorted(t for t in set(p.stop_token_ids) | (set() if p.ignore_eos else engine.eos_ids) if t < raw.shape[1])
            for j in range(len(d) + 1):
                params.append(p)
                histories.append((prompt, seq.output_ids + d[:j]))
                stop_rows.append(stops if seq.num_output + j < p.min_tokens else [])
        logits = apply_penalties(raw.clone(), params, histories)
        for row, stops in enumerate(stop_rows):
            logits[row, stops] = float("-inf")
        return logits

    def propose(self, engine, chunks: list[tuple[Sequence, int]], starts: list[int], hidden: torch.Tensor) -> None:
        """Run the MTP over each sequence's newly valid positions (hidden [T, d] of the model there), then
        draft up to k tokens for every sequence that is decoding."""
        _, ctx = engine.runner.context(chunks, starts=starts)
        nxt = [t for (seq, n), s in zip(chunks, starts) for t in seq.token_ids[s + 1 : s + n + 1]]
        h = self.mtp(engine.model, hidden, torch.tensor(nxt, device=hidden.device), ctx.positions + 1, ctx)
        seqs, last = [], []
        for i, (seq, _) in enumerate(chunks):
            seq.spec_tokens, seq.spec_probs = [], None
            if seq.num_computed == len(seq.token_ids) - 1 and self.budget(engine, seq) > 0:
                seqs.append(seq)
                last.append(ctx.q_starts[i + 1] - 1)
        if seqs:
            self.draft(engine, seqs, h[last])
        for seq, _ in chunks:
            if seq.num_computed == len(seq.token_ids) - 1:
                engine.blocks.trim(seq, len(seq.token_ids) + len(seq.spec_tokens))

    def draft(self, engine, seqs: list[Sequence], h: torch.Tensor) -> None:
        """Drafts from the MTP outputs h [B, d] at each sequence's last valid position, then k - 1 more passes."""
        budgets = [self.budget(engine, seq) for seq in seqs]
        live, probs = list(range(len(seqs))), [[] for _ in seqs]
        for j in range(max(budgets)):
            if j:
                keep = [i for i in live if budgets[i] > j and engine.blocks.ensure(seqs[i], seqs[i].num_computed + j)]
                if not keep:
                    break
                h = h[[live.index(i) for i in keep]]
                live = keep
                _, ctx = engine.runner.context([(seqs[i], 1) for i in live], starts=[seqs[i].num_computed + j - 1 for i in live])
                prev = torch.tensor([seqs[i].spec_tokens[-1] for i in live], device=h.device)
                h = self.mtp(engine.model, h, prev, ctx.positions + 1, ctx)
            logits = engine.model.logits(h).float()
            q = probabilities(logits, [seqs[i].params for i in live])
            tokens = [q[r].argmax() if seqs[i].params.greedy else draw(q[r : r + 1], seqs[i].generator)[0]
                      for r, i in enumerate(live)]
            for r, (i, token) in enumerate(zip(live, torch.stack(tokens).tolist())):
                seqs[i].spec_tokens.append(token)
                probs[i].append(q[r])
        for seq, rows in zip(seqs, probs):
            seq.spec_probs = None if seq.params.greedy else torch.stack(rows)

    def budget(self, engine, seq: Sequence) -> int:
        """Drafts worth making: at most k, one fewer than the tokens still to generate, within the context;
        none for a sequence with a grammar or logit bias (its guide), which the engine's sampler decodes."""
        if seq.guide is not None:
            return 0
        left = (seq.params.max_tokens or engine.max_model_len) - seq.num_output
        return min(self.k, left - 1, engine.max_model_len - len(seq.token_ids))


def rejection_sample(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, generator: torch.Generator | None,
                     greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's verification: target distributions p [m + 1, V], its m drafts, the draft distributions
    q [m, V] (None when greedy) -> (accept [m] bool, the token each row emits if it is the first rejected
    one [m + 1]: a draw from (p - q)+, or from p for the bonus row m)."""
    m = len(drafts)
    if greedy:
        best = p.argmax(dim=-1)
        return best[:m] == torch.tensor(drafts, device=p.device), best
    ids = torch.tensor(drafts, device=p.device)[:, None]
    u = torch.rand(m, device=p.device, generator=generator)
    accept = u * q[:m].gather(1, ids)[:, 0] < p[:m].gather(1, ids)[:, 0]
    residual = torch.cat([(p[:m] - q[:m]).clamp(min=0), p[m:]])
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)  # p == q: never rejected anyway
    return accept, draw(residual, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of weights [n, V] (any scale): the exponential race argmax(w / E), E ~ Exp(1)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return (weights / noise).argmax(dim=-1)
