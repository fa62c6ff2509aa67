"""OnnxRunner: the device step on ONNX Runtime, for a directory `moela export onnx` wrote. The rest of
the engine (scheduler, paged cache bookkeeping, sampler) is the same as with the PyTorch runner.

    specs, dtype = read_manifest(path)                         # what LLMEngine sizes the cache from
    runner = OnnxRunner(path, CacheLayout(specs, dtype, 64), num_blocks=512, provider="cpu")
    logits, prompt_logits = runner.execute(batch)              # as Runner.execute

A step's decodes go through decode.onnx in one call; its prefill chunks through prefill.onnx, padded
to the longest chunk of a group (chunks go in one group while padding at most doubles the rows).
The caches are torch tensors on the host that ONNX Runtime reads in place (bound by address); each
call returns the new rows of every cache, which are written at their slots here, and (V4) each
sequence's per-sequence state, written at the sequence's slot (`store`).

`provider` is "cpu", "cuda" or "cann" (ONNX Runtime's CPU, CUDA and CANN execution providers). One
that this onnxruntime lacks, or that fails to start, is reported once with the fallback taken: the CPU.
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from moela.config import DTYPES
from moela.engine.cache import CacheLayout
from moela.engine.sequence import Sequence
from moela.errors import ConfigError, MoelaError
from moela.models.context import CacheSpec

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider"}
ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16}  # the dtypes `moela export onnx` writes


def read_manifest(path: Path) -> tuple[list[list[CacheSpec]], torch.dtype]:
    """The cache specs per layer and the dtype of an exported directory (errors name the file)."""
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise ConfigError(f"{path}: no manifest.json (runtime 'onnx' runs a directory written by `moela export onnx`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        specs = [[CacheSpec(**spec) for spec in layer] for layer in manifest["caches"]]
        dtype = DTYPES[manifest["dtype"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{file}: not a moela ONNX manifest ({type(e).__name__}: {e})") from None
    return specs, dtype


def start_sessions(path: Path, provider: str, threads: int) -> tuple[dict, dict]:
    """({graph name: InferenceSession} on `provider`, or on the CPU after saying once why not; the weights
    they share, to keep alive with them)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MoelaError("runtime 'onnx' needs onnxruntime: pip install 'moela[onnx]'") from None
    want, available = PROVIDERS[provider], ort.get_available_providers()
    chain = list(dict.fromkeys([want, "CPUExecutionProvider"])) if want in available else ["CPUExecutionProvider"]
    if want not in available:
        log.warning("provider %r: this onnxruntime has no %s (it has %s); falling back to the CPU (CPUExecutionProvider)",
                    provider, want, ", ".join(available))
    sessions, shared = {}, shared_weights(Path(path), ("decode", "prefill"))
    for name, weights in shared.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.disable_prepacking", "1")  # a packed copy per session otherwise
        for initializer, (_, value) in weights.items():
            options.add_initializer(initializer, value)
        sessions[name] = ort.InferenceSession(str(Path(path) / f"{name}.onnx"), options, providers=chain)
        started = sessions[name].get_providers()[0]
        if started != chain[0]:
            log.warning("provider %r: %s did not start (onnxruntime's log above says why); falling back to the "
                        "CPU (CPUExecutionProvider)", provider, chain[0])
            chain = ["CPUExecutionProvider"]
    return sessions, shared


def shared_weights(path: Path, graphs: tuple[str, ...]) -> dict[str, dict]:
    """{graph: {initializer name: (array, OrtValue)}} over one read-only map of weights.data, so the graphs'
    sessions read the same pages (which the page cache also shares between processes) instead of a copy
    each. The OrtValues borrow the arrays' memory: keep both alive as long as the sessions."""
    import onnx
    import onnxruntime as ort

    data = np.memmap(path / "weights.data", dtype=np.uint8, mode="r")
    at_offset: dict[int, object] = {}
    out = {}
    for graph in graphs:
        model = onnx.load(str(path / f"{graph}.onnx"), load_external_data=False)
        out[graph] = {}
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            where = {entry.key: int(entry.value) for entry in tensor.external_data if entry.key in ("offset", "length")}
            offset = where.get("offset", 0)
            if offset not in at_offset:
                values = data[offset : offset + where["length"]].view(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
                values = values.reshape(tuple(tensor.dims))
                at_offset[offset] = (values, ort.OrtValue.ortvalue_from_numpy(values))
            out[graph][tensor.name] = at_offset[offset]
    return out


def pad_groups(lengths: dict[int, int]) -> list[list[int]]:
    """Batch entries (by new-token count) in groups, longest first, each padded to its longest: an entry
    joins the group while the padded rows stay at most twice the real ones."""
    groups: list[list[int]] = []
    for b in sorted(lengths, key=lambda b: -lengths[b]):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * lengths[group[0]] <= 2 * (sum(lengths[g] for g in group) + lengths[b]):
            group.append(b)
        else:
            groups.append([b])
    return groups


class OnnxRunner:
    def __init__(self, path: Path, layout: CacheLayout, num_blocks: int, provider: str = "cpu", num_slots: int = 0):
        if layout.dtype not in ORT_TYPES:
            raise ConfigError(f"{path}: graphs in {layout.dtype} cannot run here (export with --dtype float32 or float16)")
        self.block_size, self.element_type = layout.block_size, ORT_TYPES[layout.dtype]
        self.sessions, self.weights = start_sessions(path, provider, torch.get_num_threads())
        self.provider = self.sessions["decode"].get_providers()[0]
        self.caches = layout.allocate(num_blocks, num_slots, torch.device("cpu"))
        self.inputs = [(f"{spec.name}.{i}", spec, self.caches[i][spec.name])  # graph input name, spec, tensor
                       for i, specs in enumerate(layout.specs) for spec in specs]
        self.feeds = {name: {i.name for i in session.get_inputs()} for name, session in self.sessions.items()}

    def execute(self, batch: list[tuple[Sequence, int]], all_rows: set[int] = frozenset()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Return (logits of each batch entry's last row [B, V], {b: logits of all of b's rows} for b in all_rows)."""
        last: dict[int, torch.Tensor] = {}
        every: dict[int, torch.Tensor] = {}
        decodes = [b for b, (_, n) in enumerate(batch) if n == 1 and b not in all_rows]
        chunks = {b: n for b, (_, n) in enumerate(batch) if b not in decodes}
        for graph, group in ([("decode", decodes)] if decodes else []) + [("prefill", g) for g in pad_groups(chunks)]:
            all_logits = any(b in all_rows for b in group)
            logits = self._run(graph, [batch[b] for b in group], all_logits)
            for i, b in enumerate(group):
                n = batch[b][1]
                last[b] = logits[i] if graph == "decode" else logits[i, n - 1 if all_logits else 0]
                if b in all_rows:
                    every[b] = logits[i, :n]
        return torch.stack([last[b] for b in range(len(batch))]), every

    def _run(self, graph: str, seqs: list[tuple[Sequence, int]], all_logits: bool) -> torch.Tensor:
        """One call of `graph` on seqs, whose new cache rows it writes; returns the logits ([B, V] decode,
        [B, R, V] prefill: R = 1, the last row, or with all_logits every row)."""
        bs, S = self.block_size, max(n for _, n in seqs)
        starts = [seq.num_computed for seq, _ in seqs]
        width = max(1, max(math.ceil(s / bs) for s in starts))  # table blocks holding what is cached
        feeds = {"tokens": [seq.token_ids[s : s + n] + [0] * (S - n) for (seq, n), s in zip(seqs, starts)],
                 "positions": [list(range(s, s + S)) for s in starts],
                 "block_tables": [(seq.block_table[:width] + [0] * width)[:width] for seq, _ in seqs]}
        if graph == "decode":
            feeds["tokens"], feeds["positions"] = [t[0] for t in feeds["tokens"]], [p[0] for p in feeds["positions"]]
        else:
            feeds["logit_rows"] = [list(range(S)) if all_logits else [n - 1] for _, n in seqs]
            feeds["lengths"] = [n for _, n in seqs]
        if "seq_slots" in self.feeds[graph]:  # models with per-sequence caches (V4)
            feeds["seq_slots"] = [seq.slot for seq, _ in seqs]
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, values in feeds.items():
            if name in self.feeds[graph]:
                binding.bind_cpu_input(name, np.asarray(values, dtype=np.int64))
        for name, _, cache in self.inputs:
            binding.bind_input(name, "cpu", 0, self.element_type, list(cache.shape), cache.data_ptr())
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")
        session.run_with_iobinding(binding)
        logits, *new = (torch.from_numpy(a) for a in binding.copy_outputs_to_cpu())
        for (_, spec, cache), written in zip(self.inputs, new):
            store(spec, cache, written, seqs, starts)
        return logits


def store(spec: CacheSpec, cache: torch.Tensor, written: torch.Tensor, seqs: list[tuple[Sequence, int]],
          starts: list[int]) -> None:
    """Write one cache's graph output. A per-sequence kind: each sequence's whole state at its slot. A paged
    kind: per sequence, K entries from the one its first new row falls in (K = the new rows for a
    per-token kind, one per `tokens_per_entry` otherwise), of which the step's real rows completed the
    first few; those go to their rows of the sequence's blocks."""
    width = cache.shape[-1]
    if not spec.paged:
        cache[[seq.slot for seq, _ in seqs]] = written.view(len(seqs), *cache.shape[1:]).to(cache.dtype)
        return
    rate, per_block, K = spec.tokens_per_entry, cache.shape[1], written.numel() // (len(seqs) * width)
    rows, src = [], []
    for i, ((seq, n), s) in enumerate(zip(seqs, starts)):
        for e in range(s // rate, (s + n) // rate):
            rows.append(seq.block_table[e // per_block] * per_block + e % per_block)
            src.append(i * K + e - s // rate)
    cache.view(-1, width)[rows] = written.reshape(-1, width)[src].to(cache.dtype)
