"""Batched KV cache for the CPU engine: pre-allocated per-layer buffers behind a `transformers` Cache.

Layout: one buffer per layer, (rows, kv_heads, capacity, head_dim). The running batch occupies rows
[0, B) and columns [0, L); a row that is shorter than L is left-padded (`pads[row]` masked columns) and
gets explicit position ids, so every row computes exactly what it would compute alone. A decode step
writes one column in place (no re-concatenation of the cache); capacity grows geometrically. Columns
are only moved when a request joins with a prompt longer than L (the others shift right), when a row
leaves (the last row moves into its slot) or when every remaining row carries a lot of left padding
(all shift left). Row r's columns [pads[r], L) are exactly its prompt plus the generated tokens fed
back so far: what the prefix cache copies when the row leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["BatchKVCache"]


class _SlotLayer(DynamicLayer):
    """One decoder layer's slice of BatchKVCache: writes new columns in place, returns views."""

    def __init__(self, owner: BatchKVCache):
        super().__init__()
        self._owner = owner
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    def update(self, key_states, value_states, cache_kwargs=None):
        o = self._owner
        rows, start = o.batch, o.length
        end = start + key_states.shape[-2]
        self.kbuf[:rows, :, start:end] = key_states
        self.vbuf[:rows, :, start:end] = value_states
        self.keys, self.values = self.kbuf[:rows, :, :end], self.vbuf[:rows, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self._owner.length + cache_position.shape[0], 0


class BatchKVCache(Cache):
    """Left-padded batched KV cache over pre-allocated buffers (see the module docstring)."""

    def __init__(self, num_layers: int, max_rows: int, column_chunk: int = 128):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.max_rows = max_rows
        self.column_chunk = column_chunk
        self.batch = 0  # rows in use
        self.length = 0  # columns in use
        self.pads: list[int] = []  # masked left columns per row
        self.rows_cap = 0
        self.cols_cap = 0
        self.moved_columns = 0  # columns copied by merges / shifts / compaction (for benchmarks)

    # -- capacity --
    def _ensure(self, rows: int, cols: int, like: torch.Tensor) -> None:
        if rows <= self.rows_cap and cols <= self.cols_cap:
            return
        new_rows = min(self.max_rows, max(rows, 2 * self.rows_cap, 1)) if rows > self.rows_cap else self.rows_cap
        new_rows = max(new_rows, rows)
        if cols > self.cols_cap:
            grow = max(cols, self.cols_cap + self.cols_cap // 2)
            new_cols = -(-grow // self.column_chunk) * self.column_chunk
        else:
            new_cols = self.cols_cap
        _, heads, _, head_dim = like.shape
        b, n = self.batch, self.length
        shape = (new_rows, heads, new_cols, head_dim)
        # allocate everything first: an out-of-memory error leaves the cache as it was
        fresh = [(like.new_empty(shape), like.new_empty(shape)) for _ in self.layers]
        for layer, (kbuf, vbuf) in zip(self.layers, fresh, strict=True):
            if layer.kbuf is not None and b and n:
                kbuf[:b, :, :n] = layer.kbuf[:b, :, :n]
                vbuf[:b, :, :n] = layer.vbuf[:b, :, :n]
            layer.kbuf, layer.vbuf = kbuf, vbuf
            layer.is_initialized = True
        self.rows_cap, self.cols_cap = new_rows, new_cols

    def reserve_step(self) -> None:
        """Make room for one more column (a decode step)."""
        if self.length + 1 > self.cols_cap:
            self._ensure(self.batch, self.length + 1, self.layers[0].kbuf)

    def release(self) -> None:
        for layer in self.layers:
            layer.kbuf = layer.vbuf = layer.keys = layer.values = None
            layer.is_initialized = False
        self.batch = self.length = self.rows_cap = self.cols_cap = 0
        self.pads = []

    # -- membership --
    def add_row(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Append one request's prefilled cache ((1, heads, n, head_dim) per layer); returns its row."""
        n = kv[0][0].shape[-2]
        b, length = self.batch, self.length
        if b == 0:
            length = 0
        new_len = max(length, n)
        self._ensure(b + 1, new_len + 1, kv[0][0])
        if b and n > length:  # the newcomer is longer: shift the running rows right
            s = n - length
            for layer in self.layers:
                for buf in (layer.kbuf, layer.vbuf):
                    buf[:b, :, s : s + length] = buf[:b, :, :length].clone()
                    buf[:b, :, :s] = 0
            self.pads = [p + s for p in self.pads]
            self.moved_columns += b * length
        pad = new_len - n
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.kbuf[b, :, pad:new_len] = k[0]
            layer.vbuf[b, :, pad:new_len] = v[0]
            if pad:
                layer.kbuf[b, :, :pad] = 0
                layer.vbuf[b, :, :pad] = 0
        self.pads.append(pad)
        self.batch, self.length = b + 1, new_len
        return b

    def remove_row(self, row: int) -> None:
        """Drop a row; the last row moves into its slot (callers mirror that move)."""
        last = self.batch - 1
        if row != last:
            for layer in self.layers:
                layer.kbuf[row, :, : self.length] = layer.kbuf[last, :, : self.length]
                layer.vbuf[row, :, : self.length] = layer.vbuf[last, :, : self.length]
            self.pads[row] = self.pads[last]
            self.moved_columns += self.length
        self.pads.pop()
        self.batch = last
        if self.batch == 0:
            self.length = 0

    def trim(self) -> None:
        """Drop left columns that every row masks, when that saves enough attention work."""
        if not self.batch:
            return
        p = min(self.pads)
        if p == 0 or (p * 8 < self.length and p < 64):
            return
        b, n = self.batch, self.length
        for layer in self.layers:
            for buf in (layer.kbuf, layer.vbuf):
                buf[:b, :, : n - p] = buf[:b, :, p:n].clone()
        self.pads = [x - p for x in self.pads]
        self.length = n - p
        self.moved_columns += b * (n - p)
