"""Block-granular prefix cache of KV for the CPU engine, LRU within a byte budget.

A sequence is keyed as (token id, extra id) pairs, the way TensorRT-LLM keys its KV blocks
(`prompt_table_extra_ids`: one uint64 per input token, 0 for text). Block i's key is a digest chained
over block i-1's key and block i's pairs, so one key stands for its whole prefix. A fake id
(>= vocab_size: a prompt-table row) only means something together with its extra id, so the keyable
part of a sequence ends at the first fake id whose extra id is 0 (no extra ids given: the first fake
id): two different images at the same positions never share KV.

A block's value is one tensor (layers, 2, kv_heads, block_tokens, head_dim), always a copy (never a
view of a larger buffer), so `bytes` is what the cache really holds. Eviction takes the least recently
used block and every block chained after it (they could no longer be reached). Lookups touch a chain
deepest block first, so a shared prefix outlives the branches that hang from it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PrefixCache", "block_keys", "keyable_length"]

_ROOT = b""


def keyable_length(ids: np.ndarray, extra_ids: np.ndarray | None, vocab_size: int) -> int:
    """How many leading tokens may be keyed: up to the first fake id without an extra id."""
    fake = ids >= vocab_size
    if extra_ids is not None:
        fake &= extra_ids == 0
    hits = np.flatnonzero(fake)
    return int(hits[0]) if hits.size else int(ids.size)


def block_keys(ids: np.ndarray, extra_ids: np.ndarray | None, block_tokens: int, vocab_size: int) -> list[bytes]:
    """Chained keys of the full blocks in the keyable part of (ids, extra_ids)."""
    n = keyable_length(ids, extra_ids, vocab_size) // block_tokens * block_tokens
    tok = np.ascontiguousarray(ids[:n], dtype="<i8")
    extra = np.zeros(n, "<u8") if extra_ids is None else np.ascontiguousarray(extra_ids[:n], dtype="<u8")
    keys, parent = [], _ROOT
    for start in range(0, n, block_tokens):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(tok[start : start + block_tokens].tobytes())
        h.update(extra[start : start + block_tokens].tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class _Block:
    kv: torch.Tensor
    parent: bytes
    children: set[bytes] = field(default_factory=set)


class PrefixCache:
    """Chained-key KV blocks with LRU eviction (see the module docstring). Used by one thread."""

    def __init__(self, block_tokens: int = 16, budget_bytes: int = 256 << 20):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.block_tokens = block_tokens
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # oldest first
        self.bytes = 0
        self.stats = dict(hit_blocks=0, miss_blocks=0, inserted_blocks=0, evicted_blocks=0)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def match(self, keys: list[bytes]) -> list[torch.Tensor]:
        """The cached blocks of the longest cached prefix of `keys` (counted as hits/misses, touched)."""
        found = self._longest(keys)
        self._use(keys, found)
        return [self._blocks[k].kv for k in found]

    def insert(self, keys: list[bytes], block_kv: Callable[[int], torch.Tensor]) -> int:
        """Cache the chain `keys`; `block_kv(i)` gives block i's KV (called for missing blocks only).

        Only as many leading blocks as the budget holds are kept; returns how many blocks were added.
        """
        if not keys:
            return 0
        added, parent = 0, _ROOT
        chain: list = []
        for i, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None:
                kv = block_kv(i)
                if self.bytes + kv.nbytes > self.budget_bytes:
                    self._evict_until(self.budget_bytes - kv.nbytes, keep=set(chain))
                    if self.bytes + kv.nbytes > self.budget_bytes:
                        break  # the chain so far already fills the budget
                if not kv.is_contiguous() or kv.untyped_storage().nbytes() != kv.nbytes:
                    kv = kv.clone(memory_format=torch.contiguous_format)  # own storage, nothing more
                block = _Block(kv, parent)
                self._blocks[key] = block
                self.bytes += block.kv.nbytes
                if parent in self._blocks:
                    self._blocks[parent].children.add(key)
                added += 1
            chain.append(key)
            parent = key
        self._touch(chain)
        self.stats["inserted_blocks"] += added
        return added

    def load(
        self, keys: list[bytes], cache, limit: int, device: torch.device | str = "cpu", min_tokens: int = 1
    ) -> int:
        """Put the longest cached prefix of `keys` (at most `limit` tokens) into an empty HF `cache`,
        unless it is shorter than `min_tokens` (then nothing is used: all misses).

        Returns the number of tokens loaded (0: `cache` untouched).
        """
        found = self._longest(keys)
        n = min(len(found) * self.block_tokens, limit)
        if n <= 0 or n < min_tokens:
            self._use(keys, [])
            return 0
        self._use(keys, found)
        kv = torch.cat([self._blocks[k].kv for k in found], dim=3)[:, :, :, :n].to(device)
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)
        return n

    def insert_columns(self, keys: list[bytes], layers: list[tuple[torch.Tensor, torch.Tensor]], start: int) -> int:
        """`insert` from per-layer (keys, values) buffers (heads, columns, head_dim); block i is
        columns start + i * block_tokens onwards."""
        first = next((i for i, key in enumerate(keys) if key not in self._blocks), len(keys))
        if first == len(keys):
            self._touch(keys)
            return 0
        b, lo, hi = self.block_tokens, start + first * self.block_tokens, start + len(keys) * self.block_tokens
        # one copy of every missing column, then one copy per block (blocks never share storage)
        slab = torch.stack([torch.stack((k[:, lo:hi], v[:, lo:hi])) for k, v in layers])
        return self.insert(keys, lambda i: slab[:, :, :, (i - first) * b : (i - first + 1) * b].clone())

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def held_bytes(self) -> int:
        """Bytes of storage the cached tensors keep alive (what `bytes` must equal)."""
        return sum(b.kv.untyped_storage().nbytes() for b in self._blocks.values())

    # ---- internals -------------------------------------------------------------------------------
    def _longest(self, keys: list[bytes]) -> list[bytes]:
        found = []
        for key in keys:
            if key not in self._blocks:
                break
            found.append(key)
        return found

    def _use(self, keys: list[bytes], found: list[bytes]) -> None:
        self._touch(found)
        self.stats["hit_blocks"] += len(found)
        self.stats["miss_blocks"] += len(keys) - len(found)

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):  # the root ends up most recent: leaves are evicted first
            self._blocks.move_to_end(key)

    def _evict_until(self, target: int, keep: set[bytes]) -> None:
        while self.bytes > target and self._blocks:
            victim = next((k for k in self._blocks if k not in keep), None)
            if victim is None:
                return
            self._evict(victim)

    def _evict(self, key: bytes) -> None:
        stack = [key]
        while stack:
            k = stack.pop()
            block = self._blocks.pop(k, None)
            if block is None:
                continue
            self.bytes -= block.kv.nbytes
            self.stats["evicted_blocks"] += 1
            stack.extend(block.children)
            parent = self._blocks.get(block.parent)
            if parent is not None:
                parent.children.discard(k)
