"""The per-rank runner: this rank's stage, its KV cache, input preparation, one forward, sampling.

A runner caches, per sequence, only what the scheduler sent it (tokens, block ids, sampling
parameters). The scheduler can rebuild that cache at any time by sending a sequence again as
new, so a rebuilt worker loses nothing.

One `execute(StepInput)`:
    1. forget finished sequences, register new ones, apply the running ones' diffs
    2. build the flat token batch and the attention metadata (same on every rank)
    3. first stage embeds; other stages receive hidden states from the previous stage
    4. run this stage's layers (TP all-reduces inside)
    5. not last stage: send hidden states on; last stage: logits (TP all-gather) and, on TP
       rank 0, sample and return a `StepOutput`
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scheduler.config import EngineConfig
from scheduler.wire import (
    SeqSampling,
    StepInput,
    StepOutput,
    decode_step_input,
    encode_step_output,
)
from sharding import prompt_logprobs
from sharding.compiled import CompiledDecode, check_compiler
from sharding.dist import ParallelGroups, pp_recv, pp_send
from sharding.layers.attention import AttentionGroup, AttentionMetadata, GatherWorkspace
from sharding.loader import DTYPES, load_stage
from sharding.plan import ShardPlan, load_hf_config
from sharding.sampler import Sampler, SamplerInput

DEFAULT_KV_CACHE_MEMORY = 512 * 2**20


def max_model_len_for(config: EngineConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if config.max_model_len is None:
        return int(limit)
    if limit is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                         f"{limit}; use at most {limit}")
    return config.max_model_len


def num_kv_blocks_for(config: EngineConfig, plan: ShardPlan, hf_config) -> int:
    """KV blocks per replica, the same on every rank: the stage with the most layers and the TP
    rank with the most KV heads decide (ranks may hold unequal numbers of KV heads)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    itemsize = torch.empty(0, dtype=DTYPES[config.dtype]).element_size()
    per_block = (2 * max(plan.layer_counts) * config.block_size * plan.max_kv_heads_per_rank * plan.dims.head_dim
                 * itemsize)
    budget = config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
    # more than every sequence at full length would never be used
    useful = config.max_num_seqs * math.ceil(max_model_len_for(config, hf_config) / config.block_size) + 1
    blocks = min(budget // per_block, useful)
    if blocks < 1:
        raise ValueError(f"kv_cache_memory={budget} bytes holds no KV block of {per_block} bytes; "
                         f"give at least {per_block}")
    return int(blocks)


@dataclass
class CachedSequence:
    token_ids: list[int]
    num_prompt: int
    block_ids: list[int]
    sampling: SeqSampling


def _padded(block_ids: list[int], n: int) -> list[int]:
    """The first n block ids, padded with block 0 (its slots are masked out)."""
    return block_ids[:n] + [0] * (n - min(len(block_ids), n))


class ModelRunner:
    def __init__(self, config: EngineConfig, groups: ParallelGroups):
        self.config, self.groups = config, groups
        if config.compile:   # no C++ compiler: say so before loading any weight
            check_compiler(groups.device)
        self.hf_config = load_hf_config(config.model)
        self.plan = ShardPlan.build(self.hf_config, config.tensor_parallel_size, config.pipeline_parallel_size,
                                    config.layer_split)
        self.max_model_len = max_model_len_for(config, self.hf_config)
        self.model, report = load_stage(self.hf_config, self.plan, groups, config.model, config.dtype,
                                        config.quantization, config.max_num_seqs)
        self.loaded_bytes = report.loaded_bytes
        self.quant_report = report.quant   # kernels chosen and bytes held, when quantized
        self.dtype = DTYPES[config.dtype]
        self.num_kv_blocks = num_kv_blocks_for(config, self.plan, self.hf_config)
        self.block_size = config.block_size
        kv_heads = len(self.plan.kv_heads(groups.tp_rank))   # this rank's own, replicated ones included
        # compile=True: decode steps padded to a bucket; the padding rows write their K/V into one
        # extra block past the scheduler's (it never hands that block out)
        self.compiled = CompiledDecode(self.model, config.max_num_seqs, groups.device) if config.compile else None
        self.scratch_block = self.num_kv_blocks
        blocks = self.num_kv_blocks + (self.compiled is not None)
        shape = (2, blocks, config.block_size, kv_heads, self.plan.dims.head_dim)
        # zeros, not empty: masked slots are multiplied by 0 and must not hold NaN garbage
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=groups.device)
                          for _ in self.plan.layers(groups.pp_rank)]
        self.sliding_window = self._sliding_window()
        self.sampler = Sampler(groups.device, config.seed)
        self.workspace = GatherWorkspace()   # gathered K/V buffers, reused by every layer and step
        self.seqs: dict[int, CachedSequence] = {}

    def _sliding_window(self) -> int | None:
        cfg = self.hf_config
        if cfg.model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=True is not supported")
        window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        return int(window) if window else None

    # 1. the sequence cache
    def _update_cache(self, step: StepInput) -> None:
        for seq_id in step.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in step.new_sequences:
            self.seqs[new.seq_id] = CachedSequence(list(new.token_ids), new.num_prompt_tokens,
                                                   list(new.block_ids), new.sampling)
        for s in step.scheduled:
            seq = self.seqs.get(s.seq_id)
            if seq is None:
                raise KeyError(f"sequence {s.seq_id} was scheduled but never sent to this rank as new")
            seq.token_ids.extend(s.appended_token_ids)
            seq.block_ids.extend(s.new_block_ids)
            end = s.num_computed + s.num_new
            if end > len(seq.token_ids) or end > len(seq.block_ids) * self.block_size:
                raise ValueError(f"sequence {s.seq_id}: step computes tokens up to {end} but the rank knows "
                                 f"{len(seq.token_ids)} tokens and {len(seq.block_ids)} blocks")

    # 2. inputs
    def _decode_padding(self, sched) -> int | None:
        """Dummy sequences that pad a pure decode step up to its compiled bucket; None: run it eagerly."""
        if self.compiled is None or any(s.num_new != 1 for s in sched):
            return None
        bucket = self.compiled.bucket(len(sched))
        return None if bucket is None else bucket - len(sched)

    def _prepare(self, step: StepInput, pad: int = 0) -> tuple[torch.Tensor, AttentionMetadata]:
        """`pad` dummy decode sequences go last: one token at position 0 in the scratch block."""
        dev, bs = self.groups.device, self.block_size
        sched = step.scheduled
        seqs = [self.seqs[s.seq_id] for s in sched]
        num_new = torch.tensor([s.num_new for s in sched] + [1] * pad, device=dev)
        num_computed = torch.tensor([s.num_computed for s in sched] + [0] * pad, device=dev)
        max_blocks = int((int((num_computed + num_new).max()) + bs - 1) // bs)
        block_tables = torch.tensor([_padded(seq.block_ids, max_blocks) for seq in seqs]
                                    + [[self.scratch_block] * max_blocks] * pad, dtype=torch.long, device=dev)
        ids = torch.tensor([t for s, seq in zip(sched, seqs)
                            for t in seq.token_ids[s.num_computed:s.num_computed + s.num_new]] + [0] * pad, device=dev)
        q_seq = torch.repeat_interleave(torch.arange(num_new.shape[0], device=dev), num_new)
        q_off = torch.arange(q_seq.shape[0], device=dev) - (torch.cumsum(num_new, 0) - num_new)[q_seq]
        positions = num_computed[q_seq] + q_off
        slot_mapping = block_tables[q_seq, positions // bs] * bs + positions % bs
        decode = num_new == 1
        if bool(decode.all()) or not bool(decode.any()):
            groups = [self._group(None, q_seq, q_off, num_new, num_computed, block_tables)]
        else:
            groups = [self._group(rows, q_seq, q_off, num_new, num_computed, block_tables)
                      for rows in (decode.nonzero().squeeze(1), (~decode).nonzero().squeeze(1))]
        return ids, AttentionMetadata(positions=positions, slot_mapping=slot_mapping, groups=groups,
                                      workspace=self.workspace)

    def _group(self, rows, q_seq, q_off, num_new, num_computed, block_tables) -> AttentionGroup:
        """Attention inputs for the sequences `rows` (None: all of them)."""
        dev, bs = self.groups.device, self.block_size
        if rows is None:
            token_idx = torch.arange(q_seq.shape[0], device=dev)
        else:
            token_idx = torch.isin(q_seq, rows).nonzero().squeeze(1)
            remap = torch.full((num_new.shape[0],), -1, dtype=torch.long, device=dev)
            remap[rows] = torch.arange(rows.shape[0], device=dev)
            q_seq, q_off = remap[q_seq[token_idx]], q_off[token_idx]
            num_new, num_computed = num_new[rows], num_computed[rows]
            max_blocks = int((int((num_computed + num_new).max()) + bs - 1) // bs)
            block_tables = block_tables[rows, :max_blocks]
        max_q = int(num_new.max())
        # mask[b, 0, i, j]: query i of sequence b may see key position j
        qi = torch.arange(max_q, device=dev)
        kj = torch.arange(block_tables.shape[1] * bs, device=dev)
        qpos = num_computed[:, None] + qi[None, :]                      # [B, max_q]
        real_q = qi[None, :] < num_new[:, None]                           # [B, max_q]
        allowed = kj[None, None, :] <= qpos[:, :, None]
        if self.sliding_window:
            allowed &= qpos[:, :, None] - kj[None, None, :] < self.sliding_window
        pad_row = (~real_q)[:, :, None] & (kj == 0)[None, None, :]        # padding queries see slot 0 only
        mask = ((allowed & real_q[:, :, None]) | pad_row)[:, None]
        return AttentionGroup(token_idx=token_idx, block_tables=block_tables, q_seq=q_seq, q_off=q_off,
                              mask=mask, max_q=max_q)

    # 3-5. forward
    @torch.inference_mode()
    def forward_logits(self, step: StepInput) -> torch.Tensor | None:
        """Logits [num sampled sequences, vocab] on last-stage ranks, None elsewhere."""
        self._update_cache(step)
        self.prompt_logprobs: list[list] = []
        if not step.scheduled:
            return None
        pad = self._decode_padding(step.scheduled)
        ids, meta = self._prepare(step, pad or 0)
        g = self.groups
        if g.is_first_stage:
            x = self.model.embed(ids, meta.positions)
        else:
            x = pp_recv((ids.shape[0], self.plan.dims.hidden_size), self.dtype, g)
        # x: [T + pad, hidden]; padding rows are last and never read below
        forward = self.model if pad is None else self.compiled.forward
        x = forward(x, self.kv_caches, meta)
        if not g.is_last_stage:
            pp_send(x, g)
            return None
        self.prompt_logprobs = prompt_logprobs.compute(self.model, step, self.seqs, x)
        ends = torch.cumsum(torch.tensor([s.num_new for s in step.scheduled]), 0) - 1
        rows = ends[[i for i, s in enumerate(step.scheduled) if s.sample]]
        return self.model.logits(x[rows.to(x.device)])

    def execute(self, step: StepInput) -> StepOutput | None:
        logits = self.forward_logits(step)
        if not self.groups.is_driver:
            return None
        out = StepOutput(step_id=step.step_id, replica=step.replica, micro_batch=step.micro_batch,
                         prompt_logprobs=self.prompt_logprobs)
        sampled = [s for s in step.scheduled if s.sample]
        if logits is None or not sampled:
            return out
        seqs = [self.seqs[s.seq_id] for s in sampled]
        result = self.sampler(logits, SamplerInput([q.sampling for q in seqs], [q.token_ids for q in seqs],
                                                   [q.num_prompt for q in seqs]))
        out.seq_ids = [s.seq_id for s in sampled]
        out.token_ids, out.logprobs, out.top_logprobs = result.token_ids, result.logprobs, result.top_logprobs
        return out

    def execute_bytes(self, data: bytes) -> bytes | None:
        out = self.execute(decode_step_input(data))
        return None if out is None else encode_step_output(out)
