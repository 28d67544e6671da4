"""Mask state of one binarized tensor: soft refresh, the deterministic policy, and seeded randomness.

Only a transitioning tensor holds a materialized bool mask; a continuous tensor is the constant `False` and a
frozen one the constant `True`, so stages that are not transitioning cost no memory (docs/design.md, "Core").
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers (seed, stage, step, tensor index, ...) into a 63-bit generator seed (splitmix64 rounds).

    Every rank and every resumed run derives the same seed from the same tuple, so masks need no communication.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def make_generator(device: torch.device, *seed_parts: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(*seed_parts))
    return gen


def sample_distinct(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`k` distinct indices in [0, n), uniformly, in O(k log k) for k << n (no permutation of all n entries)."""
    if k >= n:
        return torch.arange(n, device=device)
    if 2 * k > n:
        return torch.randperm(n, generator=generator, device=device)[:k]
    idx = torch.unique(torch.randint(n, (k,), generator=generator, device=device))
    while idx.numel() < k:  # expected k^2 / 2n collisions, re-drawn until none are left
        extra = torch.randint(n, (k - idx.numel(),), generator=generator, device=device)
        idx = torch.unique(torch.cat([idx, extra]))
    return idx


class MaskState:
    """The mask of one tensor: the constant False (continuous), True (frozen) or a bool tensor (transitioning)."""

    def __init__(self, shape: tuple[int, ...] | torch.Size) -> None:
        self.shape = tuple(shape)
        self.numel = 1
        for d in self.shape:
            self.numel *= d
        self.value: bool | torch.Tensor = False

    def fill(self, frozen: bool) -> None:
        """Make every entry continuous (False) or frozen (True), releasing any materialized mask."""
        self.value = bool(frozen)

    def materialize(self, device: torch.device) -> torch.Tensor:
        if not isinstance(self.value, torch.Tensor):
            self.value = torch.full(self.shape, self.value, dtype=torch.bool, device=device)
        return self.value

    def soft_refresh(self, p: float, refresh_rate: int, generator: torch.Generator, device: torch.device) -> int:
        """Re-draw `k = floor(n / r)` distinct random entries from Bernoulli(p); return how many were drawn."""
        k = self.numel // refresh_rate
        if k == 0:
            return 0
        mask = self.materialize(device).view(-1)
        idx = sample_distinct(self.numel, k, generator, device)
        draws = torch.rand(idx.numel(), generator=generator, device=device) < p
        mask[idx] = draws
        return idx.numel()

    def set_closest(self, distance: torch.Tensor, p: float) -> None:
        """Deterministic policy: freeze the `round(p * n)` entries with the smallest `distance`."""
        k = round(p * self.numel)
        mask = self.materialize(distance.device).view(-1)
        mask.fill_(False)
        if k > 0:
            mask[torch.topk(distance.reshape(-1), k, largest=False).indices] = True

    def as_mask(self) -> bool | torch.Tensor:
        """What `masked_binarize` takes: a Python bool for constant masks, else the bool tensor."""
        return self.value

    def tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """The mask as a bool tensor of `shape` (materialized on demand for inspection, not stored)."""
        if isinstance(self.value, torch.Tensor):
            return self.value
        return torch.full(self.shape, self.value, dtype=torch.bool, device=device)

    @property
    def frozen_fraction(self) -> float:
        if isinstance(self.value, torch.Tensor):
            return self.value.sum().item() / self.numel
        return 1.0 if self.value else 0.0

    @property
    def is_transitioning(self) -> bool:
        return isinstance(self.value, torch.Tensor)
