"""The one configuration object that flows down from the client to every rank.

`EngineConfig` is frozen: derive a new one with `dataclasses.replace` instead of mutating it.
It holds plain values only (no torch, no ray), so it crosses process boundaries as-is and
`scheduler/` can read it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# weight quantization methods (meanings in sharding/quant/spec.py); int4 alone is groups of 64
SUPPORTED_QUANTIZATION = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "w8a8")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which field and what to change."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine and its workers need to know, validated once at construction."""

    model: str
    """Path to a Hugging Face model folder (config.json + *.safetensors + tokenizer files)."""
    tensor_parallel_size: int = 1
    """Ranks that split every layer's heads and columns (T)."""
    pipeline_parallel_size: int = 1
    """Stages that split the layers (P); the scheduler keeps up to P micro-batches in flight."""
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
    layer_split: tuple[int, ...] | None = None
    """Layers per pipeline stage (must sum to num_hidden_layers); None balances them."""
    collective_timeout_s: float = 120.0
    """Deadline for rendezvous and every collective, so a dead peer never hangs a rank."""
    quantization: str | None = None
    """Weight quantization each rank applies to its own slices at load: int8 / int4[-gN] (weight-only,
    memory first) or w8a8 (dynamic int8 activations, speed first); None keeps `dtype` weights."""
    extra: dict = field(default_factory=dict, hash=False, compare=False)
    """Free-form options for later capabilities (kept out of equality)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                     "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; choose one of {SUPPORTED_DTYPES}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len} must be at least 2 (a prompt and an output token)")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory={self.kv_cache_memory} must be a positive number of bytes")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks} must be at least 1")
        if self.quantization is not None and self.quantization not in SUPPORTED_QUANTIZATION:
            import difflib

            close = difflib.get_close_matches(str(self.quantization), SUPPORTED_QUANTIZATION, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"quantization={self.quantization!r} is not supported{hint}; choose one of "
                              f"{', '.join(SUPPORTED_QUANTIZATION)} or None")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"collective_timeout_s={self.collective_timeout_s} must be positive")

    @property
    def world_size(self) -> int:
        """Ranks in one replica (T x P)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size
