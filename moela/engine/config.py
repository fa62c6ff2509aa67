"""The engine's configuration, one dataclass per concern, each validated once (EngineConfig, with its
SchedulerConfig and SpeculativeConfig), and the command-line flags every engine-running command shares.

    engine_cfg = EngineConfig(model="path/to/model", dtype="bfloat16", kv_cache_memory="4GiB")
    add_engine_args(parser); ...; EngineConfig(model=..., **engine_args(parser.parse_args()))
"""

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from moela.config import QUANTIZATIONS, RUN_DTYPES, ModelConfig, resolve_dtype
from moela.ops import BACKENDS, load_device

RUNTIMES = ("torch", "onnx")  # torch: moela's model and backends; onnx: graphs from `moela export onnx` on ONNX Runtime
PROVIDERS = ("cpu", "cuda", "cann")  # ONNX Runtime's execution providers that runtime "onnx" takes


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: must be an integer >= 1")


SPECULATIVE_METHODS = {"mtp": "mtp", "deepseek_mtp": "mtp"}  # vLLM's names -> ours


@dataclass
class SpeculativeConfig:
    """vLLM's `speculative_config`: the checkpoint's MTP layer drafts num_speculative_tokens tokens per
    step and the model verifies them in its next step (moela/engine/speculative.py)."""

    method: str = "mtp"
    num_speculative_tokens: int = 1

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method = {self.method!r} is not supported: use 'mtp' (the model's "
                             "own multi-token-prediction layer)")
        self.method = SPECULATIVE_METHODS[self.method]
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config num_speculative_tokens = {k!r} is invalid: must be an integer in [1, 16]")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a dict or its JSON text (the CLI's --speculative-config); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config {value!r} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config = {value!r} is invalid: must be a dict such as "
                             '{"method": "mtp", "num_speculative_tokens": 1}')
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"speculative_config field {unknown[0]!r} is not supported (supported: method, "
                             "num_speculative_tokens)")
        return cls(**value)


@dataclass
class EngineConfig:
    model: str | Path | None = None  # None: the embedded default model
    dtype: str = "auto"  # a name of RUN_DTYPES; "auto": bfloat16 where the device computes in it natively
    device: str = "cpu"  # any device torch and the reference backend support ("cuda", "cuda:1", "npu" with torch_npu, ...)
    backend: str = "auto"  # "auto": the fastest backend for the device and dtype; or a name in moela.ops.BACKENDS
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_memory: int | str | None = None  # bytes ("4GiB" works); default: max_num_seqs full contexts, <= 1/4 of memory
    block_size: int = 64
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    skip_tokenizer_init: bool = False  # token ids in and out only (no text, no stop strings)
    threads: int | str | None = None  # CPU threads: a count, "auto" (the free cores, followed), None: torch's setting
    tensor_parallel_size: int = 1  # ranks the model is split over (docs/distributed.md)
    enable_expert_parallel: bool = False  # routed experts split by expert over the ranks, not sliced
    expert_parallel_size: int | None = None  # expert groups (default: every rank with enable_expert_parallel, else 1)
    expert_placement: str | Path | None = None  # a plan from `moela plan-experts` (default: experts in order)
    distributed_timeout: float = 600.0  # seconds a collective waits for a stalled rank before failing
    runtime: str = "torch"  # "onnx": model is a `moela export onnx` directory, run by ONNX Runtime (dtype is the graphs')
    provider: str = "cpu"  # runtime "onnx": ONNX Runtime's execution provider (cpu, cuda, cann)
    cuda_graphs: bool = False  # replay decode steps from CUDA graphs captured at start-up (moela/engine/graphs.py)
    quantization: str | None = None  # weight-only: a key of QUANTIZATIONS ("int8", "int4", ...); None: the model dtype
    speculative_config: SpeculativeConfig | dict | str | None = None  # e.g. {"method": "mtp", "num_speculative_tokens": 2}
    scheduler: SchedulerConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.threads not in (None, "auto") and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                                   or self.threads < 1):
            raise ValueError(f"threads = {self.threads!r} is invalid: must be 'auto', an integer >= 1 or None")
        if self.dtype not in RUN_DTYPES:
            raise ValueError(f"dtype = {self.dtype!r} is invalid: must be one of {', '.join(RUN_DTYPES)}")
        if self.backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend = {self.backend!r} is invalid: must be 'auto' or one of {', '.join(BACKENDS)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization = {self.quantization!r} is invalid: must be None or one of {', '.join(QUANTIZATIONS)}")
        self._check_runtime()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size = {self.block_size!r} is invalid: must be an integer >= 1")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len = {self.max_model_len!r} is invalid: must be an integer >= 2")
        load_device(self.device)  # "npu": torch_npu registers the device type
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device = {self.device!r} is invalid: use a torch device such as 'cpu' or 'cuda:0'") from None
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graphs = True needs a CUDA device, not device = {self.device!r}")
        self.scheduler = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates both
        self._check_parallel()
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    def _check_runtime(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime = {self.runtime!r} is invalid: must be one of {', '.join(RUNTIMES)}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider = {self.provider!r} is invalid: must be one of {', '.join(PROVIDERS)}")
        if self.provider != "cpu" and self.runtime != "onnx":
            raise ValueError(f"provider = {self.provider!r} applies to runtime 'onnx' only (torch runs on device=...)")
        if self.runtime == "torch":
            return
        if self.quantization is not None:
            raise ValueError(f"quantization = {self.quantization!r} applies to runtime 'torch' only (export the graphs "
                             f"in float16 instead)")
        torch_only = {"cuda_graphs": self.cuda_graphs, "speculative_config": self.speculative_config,
                      "tensor_parallel_size": self.tensor_parallel_size > 1}
        for name, used in torch_only.items():
            if used:
                raise ValueError(f"{name} applies to runtime 'torch' only, not runtime = {self.runtime!r}")

    def _check_parallel(self) -> None:
        n, ep = self.tensor_parallel_size, self.expert_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size = {n!r} is invalid: must be an integer >= 1")
        if ep is not None and (not isinstance(ep, int) or isinstance(ep, bool) or ep < 1 or n % ep):
            raise ValueError(f"expert_parallel_size = {ep!r} is invalid: must divide tensor_parallel_size = {n}")
        if self.cuda_graphs and n > 1:
            raise ValueError(f"cuda_graphs = True needs tensor_parallel_size = 1, not {n}: the other ranks follow rank 0's "
                             "eager forwards, which a graph replay skips")
        if not self.distributed_timeout > 0:
            raise ValueError(f"distributed_timeout = {self.distributed_timeout!r} is invalid: must be > 0 seconds")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, torch.device(self.device))

    @property
    def quant_format(self) -> str | None:
        """The weight format quantization names (moela.ops.reference.QUANT_FORMATS), or None."""
        return QUANTIZATIONS[self.quantization] if self.quantization else None

    def check_model(self, model: "ModelConfig") -> int:
        """The context length this engine serves the model at: max_model_len, never past the positions
        the model was built for."""
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len = {self.max_model_len} exceeds the model's max_position_embeddings = "
                             f"{limit} (config.json): it was not built for positions past that")
        return self.max_model_len or limit


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig flags every command that runs the engine shares."""
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1, npu (torch_npu), ...")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="kernels: auto picks the fastest for the device and dtype")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="onnx: run a `moela export onnx` directory on ONNX Runtime (the graphs' dtype)")
    parser.add_argument("--provider", choices=PROVIDERS, default="cpu", help="ONNX Runtime's execution provider (--runtime onnx)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay decode steps from CUDA graphs captured at start-up (CUDA devices)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="weight-only quantization, done as the checkpoint loads: int8 (per output channel) or int4 "
                             f"(zero points per group of inputs; int4 = {QUANTIZATIONS['int4']})")
    parser.add_argument("--speculative-config", type=speculative_argument, default=None,
                        help='speculative decoding as JSON, e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\': '
                             "the checkpoint's MTP layer drafts, the model verifies (default: off)")
    add_threads_arg(parser)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over this many ranks, started here (or by torchrun across machines)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="split routed experts by expert over the ranks instead of slicing each one")
    parser.add_argument("--expert-parallel-size", type=int, default=None,
                        help="expert groups, each expert sliced within its group (default: every rank with "
                             "--enable-expert-parallel)")
    parser.add_argument("--expert-placement", default=None, help="expert placement plan from `moela plan-experts`")


def engine_args(args: argparse.Namespace) -> dict:
    """The EngineConfig fields of add_engine_args' flags (and --threads), as parsed."""
    return {"device": args.device, "backend": args.backend, "cuda_graphs": args.cuda_graphs, "threads": args.threads,
            "runtime": args.runtime, "provider": args.provider, "quantization": args.quantization,
            "speculative_config": args.speculative_config,
            "tensor_parallel_size": args.tensor_parallel_size, "enable_expert_parallel": args.enable_expert_parallel,
            "expert_parallel_size": args.expert_parallel_size, "expert_placement": args.expert_placement}


def speculative_argument(value: str) -> SpeculativeConfig:
    try:
        return SpeculativeConfig.parse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    from moela import threads

    parser.add_argument("--threads", type=threads.argument, default="auto",
                        help="CPU threads: a number, or auto (the cores free now, fewer when another process takes one)")


def parse_bytes(value: int | str) -> int:
    """Bytes as an integer or a size such as "4GiB", "512MB", "1e9b"."""
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
