"""The one configuration object that flows down from the client to every rank.

`EngineConfig` is frozen: derive a new one with `dataclasses.replace` instead of mutating it.
It holds plain values only (no torch, no ray), so it crosses process boundaries as-is and
`scheduler/` can read it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.checks import INT64_MAX, INT64_MIN, check_bool, check_int, check_number, check_str
from scheduler.errors import ConfigError, ConfigTypeError, show

__all__ = ["SUPPORTED_DTYPES", "ConfigError", "ConfigTypeError", "EngineConfig"]

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_ERR = {"err": ConfigError, "type_err": ConfigTypeError}
# weight quantization methods (meanings in sharding/quant/spec.py); int4 alone is groups of 32
SUPPORTED_QUANTIZATION = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "w8a8")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine and its workers need to know, validated once at construction."""

    model: str
    """Path to a Hugging Face model folder (config.json + *.safetensors + tokenizer files)."""
    tensor_parallel_size: int = 1
    """Ranks that split every layer's heads and columns (T)."""
    pipeline_parallel_size: int = 1
    """Stages that split the layers (P); the scheduler keeps up to P micro-batches in flight."""
    pipeline_overlap: bool = True
    """With P > 1: keep P micro-batch streams in flight across steps (`scheduler.pipelined`);
    False: split each step into P micro-batches and drain the pipeline before the next step."""
    data_parallel_size: int = 1
    """Independent replicas of the whole T x P group (D)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; None means the model's max_position_embeddings."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    max_num_seqs: int = 128
    """Most sequences in one step (per replica)."""
    max_num_batched_tokens: int = 2048
    """Most tokens computed in one step (per replica); long prompts are prefilled in chunks."""
    kv_cache_memory: int | None = None
    """Bytes of KV cache per rank; ignored when num_kv_blocks is given."""
    num_kv_blocks: int | None = None
    """KV-cache blocks per replica; overrides kv_cache_memory."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks whose token prefix was already computed."""
    seed: int = 0
    """Seed for requests that do not carry their own."""
    layer_split: tuple[int, ...] | str | None = "auto"
    """Layers per pipeline stage: a tuple (summing to num_hidden_layers), None (equal counts), or
    "auto" (on a multi-node cluster, sized from the layers' bytes and each stage's node memory;
    equal counts when every stage shares one node)."""
    collective_timeout_s: float = 30.0
    """Deadline in seconds for rendezvous and every gloo/NCCL collective inside the workers (the
    process groups' timeout), so a dead or stopped peer never hangs a rank."""
    max_logprobs: int = 20
    """Most top logprobs a request may ask for per token (vLLM's default 20); beam search needs 2 x beam_width."""
    max_n: int = 128
    """Most output sequences one request may ask for (`n`, beam_width)."""
    max_waiting_requests: int | None = None
    """Most requests queued and not yet running (new or preempted) across replicas; past it a new
    request raises `QueueFullError` (HTTP 429) instead of waiting. None: unbounded (offline batches)."""
    # -- Ray executor (ignored in-process)
    cpus_per_worker: float | None = None
    """CPUs each Ray worker reserves; None: min(1, free CPUs / workers)."""
    use_gpu: bool | None = None
    """Ask every Ray worker for one GPU; None: when the cluster has GPUs."""
    connect_timeout_s: float = 10.0
    """Deadline to reach the Ray cluster at `address` / RAY_ADDRESS."""
    resource_wait_s: float = 5.0
    """How long a shortfall of free CPUs/GPUs is re-checked (just-released resources) before it is an error."""
    placement_timeout_s: float = 60.0
    """Deadline to reserve the placement groups."""
    preflight_timeout_s: float = 60.0
    """Deadline of the pre-flight check `LLM(...)` runs on a multi-node cluster (`preflight=False` skips it)."""
    startup_timeout_s: float | None = None
    """Deadline for rendezvous + loading + warm-up; None: collective_timeout_s + 300."""
    step_timeout_s: float | None = None
    """Deadline in seconds for one step on the Ray workers; a rank that misses it is treated as dead
    (its replica is rebuilt). None: collective_timeout_s."""
    max_restarts: int = 3
    """Replica rebuilds the Ray executor may do over the engine's life after a worker died, raised or
    missed the step deadline (in-flight requests are recomputed); past it, EngineDeadError. 0: fail-stop."""
    standby_workers: bool = False
    """Keep one started, idle Ray actor per rank (torch imported, no weights) that a rebuild takes over
    instead of starting processes: recovery in seconds rather than a cold start, for one idle
    process per rank. CPU only so far (cluster/ray_standby.py)."""
    quantization: str | None = None
    """Weight quantization each rank applies to its own slices at load: int8 / int4[-gN] (weight-only,
    memory first) or w8a8 (dynamic int8 activations, speed first); None keeps `dtype` weights."""
    compile: bool = False
    """Run decode steps through torch.compile (inductor; CPU needs a C++ compiler), batches padded to a
    few fixed bucket sizes; prefill and mixed steps stay eager (README: Performance)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                     "block_size", "max_num_seqs", "max_num_batched_tokens", "max_n"):
            check_int(name, getattr(self, name), lo=1, hint="a positive integer", **_ERR)
        check_str("model", self.model, type_err=ConfigTypeError)
        check_str("dtype", self.dtype, type_err=ConfigTypeError)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; choose one of {SUPPORTED_DTYPES}",
                              "dtype", self.dtype)
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, lo=2,
                      hint="None or an integer >= 2 (a prompt and an output token)", **_ERR)
        if self.kv_cache_memory is not None:
            check_int("kv_cache_memory", self.kv_cache_memory, lo=1, hint="None or a positive number of bytes",
                      **_ERR)
        if self.num_kv_blocks is not None:
            check_int("num_kv_blocks", self.num_kv_blocks, lo=1, hint="None or an integer >= 1", **_ERR)
        if self.max_waiting_requests is not None:
            check_int("max_waiting_requests", self.max_waiting_requests, lo=1,
                      hint="None (unbounded) or an integer >= 1", **_ERR)
        check_bool("enable_prefix_caching", self.enable_prefix_caching, type_err=ConfigTypeError)
        check_bool("compile", self.compile, type_err=ConfigTypeError)
        check_bool("standby_workers", self.standby_workers, type_err=ConfigTypeError)
        check_bool("pipeline_overlap", self.pipeline_overlap, type_err=ConfigTypeError)
        check_int("seed", self.seed, lo=INT64_MIN, hi=INT64_MAX, hint="a 64-bit signed integer", **_ERR)
        check_int("max_logprobs", self.max_logprobs, lo=0, **_ERR)
        check_int("max_restarts", self.max_restarts, lo=0, hi=1000, hint="an integer in [0, 1000] (0: fail-stop)",
                  **_ERR)
        if self.layer_split is not None and self.layer_split != "auto":
            self._check_layer_split()
        positive = ("> 0", lambda v: v > 0)
        for name in ("collective_timeout_s", "connect_timeout_s", "placement_timeout_s", "preflight_timeout_s"):
            check_number(name, getattr(self, name), *positive, **_ERR)
        check_number("resource_wait_s", self.resource_wait_s, ">= 0 (0: no re-check)", lambda v: v >= 0, **_ERR)
        for name in ("startup_timeout_s", "step_timeout_s", "cpus_per_worker"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), "> 0 (or None for the default)", positive[1], **_ERR)
        if self.use_gpu is not None:
            check_bool("use_gpu", self.use_gpu, type_err=ConfigTypeError)
        if self.quantization is not None:
            check_str("quantization", self.quantization, type_err=ConfigTypeError)
            if self.quantization not in SUPPORTED_QUANTIZATION:
                import difflib

                close = difflib.get_close_matches(self.quantization, SUPPORTED_QUANTIZATION, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"quantization={self.quantization!r} is not supported{hint}; choose one of "
                                  f"{', '.join(SUPPORTED_QUANTIZATION)} or None", "quantization", self.quantization)

    def _check_layer_split(self) -> None:
        split = self.layer_split
        ok = isinstance(split, (list, tuple)) and len(split) > 0 and all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in split)
        if not ok:
            err = ConfigError if isinstance(split, (list, tuple)) else ConfigTypeError
            raise err(f"layer_split={show(split)} must be \"auto\", None, or a tuple of positive layer counts per "
                      "pipeline stage, e.g. (16, 14)", "layer_split", split)
        object.__setattr__(self, "layer_split", tuple(split))   # frozen: normalize a list once, here

    @property
    def world_size(self) -> int:
        """Ranks in one replica (T x P)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size
