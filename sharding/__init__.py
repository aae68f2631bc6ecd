"""How one model is cut and run on one rank (torch; never ray).

Public surface used by `cluster/`:

- `sharding.plan.ShardPlan.build(hf_config, tp, pp, layer_split=None)`: pure layout for any
  1 <= tp <= num_attention_heads (shards may be unequal); `.describe()` and `.imbalance()`; raises
  `sharding.plan.LayoutError` (a ValueError) naming the valid choices.
- `sharding.plan.check_layout(model_dir, tp, pp, layer_split=None) -> ShardPlan`: reads config.json only.
- `sharding.dist.select_device(local_rank=0) -> tuple[torch.device, str]`: the one place that picks
  CUDA+NCCL or CPU+gloo.
- `sharding.dist.init_replica(rank, tp, pp, master_addr, master_port, timeout_s) -> ParallelGroups`:
  joins one replica's process group (world = tp*pp, rank grid arange(world).reshape(pp, tp)).
- `sharding.runner.ModelRunner(config: EngineConfig, groups: ParallelGroups)`: builds this rank's stage
  on the meta device, loads only its slices, allocates its KV cache. `.execute(StepInput) ->
  StepOutput | None` (None except on the last stage's TP rank 0); `.execute_bytes(bytes) -> bytes | None`;
  `.num_kv_blocks`; `.loaded_bytes`.
- `sharding.layer_sizes.model_byte_sizes(hf_config, dtype) -> StageBytes`: per-layer, embedding and
  LM-head bytes (accelerate, meta device), for `layer_split="auto"`.
- `sharding.runner.num_kv_blocks_for(config, plan, hf_config) -> int`: pure, the same on every rank.
"""
