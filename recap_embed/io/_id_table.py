"""The lookup structure behind `Vocab`: an ordered hash table probed with vectorised array ops.

Why not a sorted array and a binary search: a batch of 10M ids through a 10M-entry vocab needs
either a sort of the queries (0.65-0.9 s on one thread here, as much as pandas' whole hash
lookup) or 24 dependent cache misses per id. A hash table needs about one miss per id; this one
is built and probed with numpy/torch array operations only (no compiled code of ours):

* Every id is mixed by the splitmix64 finalizer, a bijection of 64-bit words, so the mixed key
  ``h`` identifies the id (no collisions to resolve, no id stored beside it) and is uniform
  whatever the ids look like.
* Entries sit in slots ordered by ``h`` (ordered linear probing, i.e. Robin Hood order): the
  home slot of ``h`` is ``floor(h * L / 2**64)`` for ``L = n / 0.75`` slots, and entry ``i`` in
  ``h`` order goes to ``slot_i = max(home_i, slot_{i-1} + 1)`` (a running maximum: built in a few
  vectorised passes). Empty slots hold a copy of the next entry (key and row), so the key array
  is non-decreasing and any slot holding ``h`` holds its row. An entry is at most ``W - 1`` slots
  after its home (``W``, a power of two, measured at build: 16-32 for 10M entries).
* A query is a branchless lower bound over the window ``[home, home + 4)`` (two gathers; about
  88% of entries are there at this load), then, for the others, over ``[home, home + W)``;
  queries are processed in chunks of 16k so that the few slots each one touches stay in cache
  between steps. The found slot's key is compared with ``h``: equal means found (its row),
  anything else means the id is not in the vocab.

Memory: ``L`` slots of an 8-byte key and a 4-byte row (int32 while rows fit, else 8 bytes) plus
``2W`` padding slots: 16 bytes per entry, as the sorted arrays were (21.3 with int64 rows).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["IdTable", "mix", "unmix"]

LOAD = 0.75  # entries per slot
CHUNK = 16384  # queries per vectorised pass
FIRST_WINDOW = 4  # slots searched for every query before the full window

_M64 = (1 << 64) - 1
_G, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_I1, _I2 = pow(_M1, -1, 1 << 64), pow(_M2, -1, 1 << 64)
_U = np.uint64
_SIGN_U = _U(1 << 63)
_SIGN_I = -(1 << 63)
_PAD_KEY = np.iinfo(np.int64).max  # the key of the padding slots (that of h = 2**64 - 1)


def _s64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def mix(ids: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of int64 ids (after adding its gamma): a uint64 per id, bijective."""
    z = ids.view(_U) + _U(_G)
    z ^= z >> _U(30)
    z *= _U(_M1)
    z ^= z >> _U(27)
    z *= _U(_M2)
    z ^= z >> _U(31)
    return z


def unmix(h: np.ndarray) -> np.ndarray:
    """The int64 ids whose `mix` is `h` (the inverse bijection)."""
    z = h.astype(_U, copy=True)
    z ^= z >> _U(31)
    z ^= z >> _U(62)
    z *= _U(_I2)
    z ^= z >> _U(27)
    z ^= z >> _U(54)
    z *= _U(_I1)
    z ^= z >> _U(30)
    z ^= z >> _U(60)
    z -= _U(_G)
    return z.view(np.int64)


def _shr(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def _mix_torch(ids: torch.Tensor) -> torch.Tensor:
    z = ids + _s64(_G)
    z = (z ^ _shr(z, 30)) * _s64(_M1)
    z = (z ^ _shr(z, 27)) * _s64(_M2)
    return z ^ _shr(z, 31)


class IdTable:
    """Raw int64 ids -> rows. Build with `IdTable.build`; `lookup` returns rows and a miss mask."""

    def __init__(self, keys: torch.Tensor, rows: torch.Tensor, slots: int, bits: int, window: int, size: int) -> None:
        self.keys = keys  # int64: mixed key XOR 2**63 (signed order = unsigned order of h), per slot
        self.rows = rows  # int32 or int64 row per slot; -1 in the padding
        self.slots = slots  # L: home slots are floor(h * L / 2**64)
        self.bits = bits  # home = ((h >> (64 - bits)) * L) >> bits
        self.window = window  # W: every entry is in [home, home + W)
        self.size = size  # entries

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, ids: np.ndarray, rows: np.ndarray) -> Tuple[Optional["IdTable"], Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
        """(table, None, None, None); or, when some id appears twice, (None, ids, rows, duplicates)
        with ids and rows ordered by mixed key and ``duplicates[i]`` true when entry ``i + 1``
        repeats entry ``i``."""
        # Written to keep the peak low (about 40 bytes per entry on top of the inputs): arrays are
        # reused in place and freed as soon as they are done with.
        n = ids.size
        h = mix(ids)
        h ^= _SIGN_U
        sorted_keys, order = torch.sort(torch.from_numpy(h.view(np.int64)))
        del h
        order_np = order.numpy()
        keys = sorted_keys.numpy()
        dup = keys[1:] == keys[:-1]
        if dup.any():
            return None, ids[order_np], rows[order_np], dup
        del dup
        rows = rows[order_np]
        del order, order_np
        slots = max(1, math.ceil(n / LOAD))
        bits = 63 - slots.bit_length()
        # slot_i = max(home_i, slot_{i-1} + 1) = i + max_{j <= i}(home_j - j)
        shifted = cls._home(keys.view(_U) ^ _SIGN_U, slots, bits)  # home
        shifted -= np.arange(n, dtype=np.int64)  # home - i
        slot = np.maximum.accumulate(shifted)
        np.subtract(slot, shifted, out=shifted)  # slot - home: the displacement
        window = max(2 * FIRST_WINDOW, 1 << int(shifted.max()).bit_length())
        del shifted
        slot += np.arange(n, dtype=np.int64)
        size = max(int(slot[-1]) + 1, slots) + 2 * window  # the padding keeps every probe in bounds
        # Slot t holds the first entry at or after it: the count of entries in slots < t.
        occupied = np.zeros(size, dtype=bool)
        occupied[slot] = True
        del slot
        nxt = np.cumsum(occupied, dtype=np.int64)
        nxt -= occupied
        del occupied
        last = int(nxt.searchsorted(n))  # first padding slot
        nxt = nxt[:last]
        table_keys = np.empty(size, dtype=np.int64)
        np.take(keys, nxt, out=table_keys[:last])
        table_keys[last:] = _PAD_KEY
        del keys, sorted_keys
        row_dtype = np.int32 if int(rows.max(initial=0)) < np.iinfo(np.int32).max else np.int64
        rows = rows.astype(row_dtype, copy=False)
        table_rows = np.empty(size, dtype=row_dtype)
        np.take(rows, nxt, out=table_rows[:last])
        table_rows[last:] = -1
        del nxt
        return cls(torch.from_numpy(table_keys), torch.from_numpy(table_rows), slots, bits, window, n), None, None, None

    @staticmethod
    def _home(h: np.ndarray, slots: int, bits: int) -> np.ndarray:
        t = h >> _U(64 - bits)
        t *= _U(slots)
        t >>= _U(bits)
        return t.view(np.int64)

    # ------------------------------------------------------------------ use

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.rows.numel() * self.rows.element_size()

    def to(self, device: torch.device) -> "IdTable":
        self.keys, self.rows = self.keys.to(device), self.rows.to(device)
        return self

    def entries(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows) of every entry, in slot order."""
        keys, rows = self.keys.cpu().numpy(), self.rows.cpu().numpy()
        # The last slot of each run of equal keys is the entry itself (the others are copies).
        last = (rows >= 0) & np.append((keys[:-1] != keys[1:]) | (rows[1:] < 0), False)
        ids = unmix(keys[last].view(_U) ^ _SIGN_U)
        return torch.from_numpy(ids), torch.from_numpy(rows[last].astype(np.int64))

    def lookup(self, ids: torch.Tensor, threads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows int64, miss bool) for int64 `ids` on the table's device; rows of misses are -1."""
        if self.keys.device.type != "cpu":
            return self._lookup_torch(ids)
        q = ids.numpy()
        out = np.empty(q.size, dtype=np.int64)
        miss = np.empty(q.size, dtype=bool)
        starts = range(0, q.size, CHUNK)
        if threads > 1 and len(starts) > 1:
            per = -(-len(starts) // threads) * CHUNK  # contiguous ranges of whole chunks
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="recap_embed-vocab") as pool:
                list(pool.map(lambda a: self._lookup_range(q, out, miss, a, min(a + per, q.size)), range(0, q.size, per)))
        else:
            self._lookup_range(q, out, miss, 0, q.size)
        return torch.from_numpy(out), torch.from_numpy(miss)

    def _lookup_range(self, q: np.ndarray, out: np.ndarray, miss: np.ndarray, lo: int, hi: int) -> None:
        keys, rows = self.keys.numpy(), self.rows.numpy()
        step = max(1, FIRST_WINDOW // 2)
        shifted = [keys[s - 1:] for s in range(1, self.window + 1)]  # keys[p + s - 1] as a take at p
        for a in range(lo, hi, CHUNK):
            b = min(a + CHUNK, hi)
            h = mix(q[a:b])
            p = self._home(h, self.slots, self.bits)
            hb = (h ^ _SIGN_U).view(np.int64)
            # Lower bound over [home, home + FIRST_WINDOW): p ends at the first slot of the window
            # whose key is >= h, or at its last slot when all are below.
            s = step
            while s:
                below = np.take(shifted[s - 1], p) < hb
                for _ in range(s):  # p += below * s, without an int64 temporary
                    p += below
                s >>= 1
            k = np.take(keys, p)
            beyond = k < hb  # the whole first window is below h: the entry may be further on
            if beyond.any():
                idx = np.flatnonzero(beyond)
                pp, hh = p[idx], hb[idx]  # from the window's last slot (below h), W more slots
                s = self.window // 2
                while s:
                    pp += (np.take(shifted[s - 1], pp) < hh) * s
                    s >>= 1
                p[idx] = pp
                k[idx] = np.take(keys, pp)
            r = np.take(rows, p)
            m = k != hb
            if (hb == _PAD_KEY).any():  # h = 2**64 - 1 may match the padding's key
                m |= r < 0
            out[a:b] = r
            if m.any():
                out[a:b][m] = -1
            miss[a:b] = m

    def _lookup_torch(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The same probe in torch ops, for a table on another device (or to check the numpy one)."""
        keys, rows = self.keys, self.rows
        h = _mix_torch(ids)
        p = ((_shr(h, 64 - self.bits) * self.slots) >> self.bits)
        hb = h ^ _SIGN_I
        s = self.window // 2
        while s:
            p = p + (keys.index_select(0, p + (s - 1)) < hb).long() * s
            s >>= 1
        k = keys.index_select(0, p)
        r = rows.index_select(0, p).long()
        m = (k != hb) | (r < 0)
        return r.masked_fill(m, -1), m
