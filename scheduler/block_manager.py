"""Paged KV-cache bookkeeping for one replica: fixed-size blocks, reference counts, prefix caching.

Block `i` of a sequence holds the K/V of its tokens [i*block_size, (i+1)*block_size). A block
that is full and computed gets a chained hash, `hash((parent_hash, tuple(tokens)))`, so equal
hashes mean equal whole prefixes. A new sequence walks its prefix's hashes and takes every
matching block (ref_count += 1) instead of computing it again; those tokens count as computed.
The last prompt token is never served from the cache, so each sequence computes at least one
token and gets logits to sample from (as vLLM does).

Free blocks live in two pools: never-hashed ones, handed out first, and cached ones (ref 0 but
still in the hash table), handed out least recently freed first; handing one out evicts its hash.

Example (block_size=4, prefix caching on):
    seq A, prompt [1..10]: allocate -> blocks [0, 1, 2], nothing cached.
    A computes its prompt -> blocks 0 and 1 are full: hashed.
    seq B, prompt [1..8, 99]: allocate -> takes 0 and 1 (8 tokens computed), new block 3.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from scheduler.request import Sequence


class BlockError(RuntimeError):
    """Bookkeeping went wrong (double free, freeing a block nobody owns): a scheduler bug."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # to rule out hash collisions
        self.hash_to_block: dict[int, int] = {}
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()   # LRU: oldest first
        # prefix-cache counters (for tests and metrics)
        self.prefix_hit_tokens = 0
        self.prefix_hit_blocks = 0
        self.prefix_query_tokens = 0

    # -- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    def all_free(self) -> bool:
        """No block is referenced (every sequence freed its blocks exactly once)."""
        return self.num_free_blocks == self.num_blocks and not any(self.ref_counts)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission -----------------------------------------------------------------------

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Sets `seq.block_table`, `seq.num_computed_tokens` (tokens served by the cache) and
        `seq.block_hashes`. Returns False, changing nothing, if there are not enough free blocks.
        """
        assert not seq.block_table, f"seq {seq.seq_id} already owns blocks"
        hits, hashes = self._find_cached_prefix(seq)
        need = self.blocks_needed(seq.num_tokens) - len(hits)
        hits_in_free_pool = sum(1 for b in hits if self.ref_counts[b] == 0)
        if self.num_free_blocks - hits_in_free_pool < need:
            return False
        for b in hits:
            if self.ref_counts[b] == 0:
                del self._free_cached[b]
            self.ref_counts[b] += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(need)]
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        if self.enable_prefix_caching:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_computed_tokens
            self.prefix_hit_blocks += len(hits)
        return True

    def _find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        if not self.enable_prefix_caching or seq.sampling.prompt_logprobs is not None:
            return [], []   # prompt logprobs need every prompt position computed
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs       # never the block holding the last token
        blocks: list[int] = []
        hashes: list[int] = []
        parent = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            h = hash((parent, tokens))
            b = self.hash_to_block.get(h)
            if b is None or self.block_tokens[b] != tokens:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    # -- growth --------------------------------------------------------------------------

    def can_append(self, seq: Sequence) -> bool:
        """Are there enough free blocks to hold all of seq's tokens?"""
        return self.blocks_needed(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence) -> None:
        """Add blocks so the table covers all of seq's tokens (call after can_append)."""
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_free_block())

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            h = hash((parent, tokens))
            seq.block_hashes.append(h)
            b = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[b] is None:
                self.hash_to_block[h] = b
                self.block_hash[b] = h
                self.block_tokens[b] = tokens

    # -- release -------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses go back to the free pools (tail first)."""
        for b in reversed(seq.block_table):
            if self.ref_counts[b] <= 0:
                raise BlockError(f"double free of block {b} by seq {seq.seq_id}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    self._free_plain.append(b)
                else:
                    self._free_cached[b] = None
        seq.block_table = []
        seq.block_hashes = []

    def _take_free_block(self) -> int:
        if self._free_plain:
            b = self._free_plain.popleft()
        elif self._free_cached:
            b, _ = self._free_cached.popitem(last=False)     # evict the least recently freed
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = None
            self.block_tokens[b] = None
        else:
            raise BlockError("no free KV block (the scheduler must check before allocating)")
        assert self.ref_counts[b] == 0
        self.ref_counts[b] = 1
        return b

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of every free cached block (blocks in use keep theirs)."""
        while self._free_cached:
            b, _ = self._free_cached.popitem(last=False)
            del self.hash_to_block[self.block_hash[b]]
            self.block_hash[b] = None
            self.block_tokens[b] = None
            self._free_plain.append(b)
