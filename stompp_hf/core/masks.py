"""Mask state of one binarized tensor: soft refresh, the deterministic policy, and seeded randomness.

Only a transitioning tensor holds a materialized bool mask; a continuous tensor is the constant `False` and a
frozen one the constant `True`, so stages that are not transitioning cost no memory (docs/design.md, "Core").

Every mask state also has an integer `handle`, fixed for its lifetime: under `torch.compile` a layer refers to its
mask by that handle (`core.functional.state_binarize`), so the compiled graph does not depend on the state and is
not recompiled when a stage moves on (docs/design.md, "torch.compile").
"""

from __future__ import annotations

import itertools
import weakref

import torch

_MASK64 = (1 << 64) - 1

#: Every live `MaskState` by its `handle` (weakly: a state is dropped with its binarizer).
_STATES: weakref.WeakValueDictionary[int, MaskState] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


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
        self._register()

    @torch.compiler.disable  # a mask sized inside a compiled forward (an input's first one) registers eagerly
    def _register(self) -> None:
        #: Names this state to the compiled binarize (`core.functional.state_binarize`); unique per live state.
        self.handle = next(_HANDLES)
        #: What `state_token()` was at the last compiled forward that read this state (checked by its backward).
        self.compiled_token: object = None
        _STATES[self.handle] = self

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("handle", "compiled_token")}

    def __setstate__(self, state: dict) -> None:
        # a copy (`copy.deepcopy` of a model, pickling) is a new state: it gets its own handle
        self.__dict__.update(state)
        self._register()

    @staticmethod
    def from_handle(handle: int) -> MaskState:
        """The live state of `handle` (raises `RuntimeError` when it is gone)."""
        state = _STATES.get(handle)
        if state is None:
            raise RuntimeError(f"StoMPP mask state {handle} no longer exists (its model was deleted).")
        return state

    def state_token(self) -> object:
        """Changes whenever the mask does: the constant, or the mask tensor's identity and version counter."""
        value = self.value
        return (id(value), value._version) if isinstance(value, torch.Tensor) else value

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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint encoding of one mask state: the `_extra_state` of a `Binarizer` (docs/design.md, "Export").

#: State codes of an encoded mask.
CONTINUOUS, FROZEN, TRANSITIONING, UNSIZED, ABSENT = range(5)
_MAGIC = b"SM"
_FORMAT_VERSION = 1
_HEADER = 2 + 1 + 1 + 3 * 8  # magic, version, code, step, total_steps, numel


def mask_code(mask: MaskState | None) -> int:
    """The state code of `mask`: `UNSIZED` (None), `CONTINUOUS`, `FROZEN` or `TRANSITIONING`."""
    if mask is None:
        return UNSIZED
    if mask.is_transitioning:
        return TRANSITIONING
    return FROZEN if mask.value else CONTINUOUS


def encode_mask_state(mask: MaskState | None, step: int = -1, total_steps: int = -1) -> torch.Tensor:
    """A uint8 tensor holding `mask` (its code, and its bits 8 per byte when transitioning) and the progression
    position `(step, total_steps)` it was drawn at (-1 when no controller moved it).

    Layout: b"SM", version, code, then step, total_steps and numel as little-endian int64, then
    `pack_signs(mask.view(1, -1))` for a transitioning mask (bit set = frozen).
    """
    from .packing import pack_signs

    code, numel = mask_code(mask), (mask.numel if mask is not None else 0)
    header = _MAGIC + bytes([_FORMAT_VERSION, code])
    header += b"".join(int(v).to_bytes(8, "little", signed=True) for v in (step, total_steps, numel))
    out = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    if code == TRANSITIONING:
        bits = pack_signs(mask.value.detach().reshape(1, -1).cpu()).reshape(-1)
        out = torch.cat([out, bits])
    return out


def absent_mask_state() -> torch.Tensor:
    """The encoding `load_state_dict` substitutes for a checkpoint that stores no mask (it changes nothing)."""
    return torch.tensor(list(_MAGIC) + [_FORMAT_VERSION, ABSENT] + [0] * 24, dtype=torch.uint8)


def decode_mask_state(state: torch.Tensor) -> tuple[int, torch.Tensor | None, int, int, int]:
    """`(code, bool mask or None, step, total_steps, numel)` of an `encode_mask_state` tensor.

    Raises:
        ValueError: for a tensor that is not such an encoding (wrong dtype, magic, version or length).
    """
    from .packing import unpack_signs

    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
        raise ValueError(f"Not a StoMPP mask state: expected a 1-D uint8 tensor, got {type(state).__name__}.")
    raw = bytes(state[:_HEADER].cpu().tolist())
    if len(raw) < _HEADER or raw[:2] != _MAGIC or raw[2] != _FORMAT_VERSION or raw[3] > ABSENT:
        raise ValueError("Not a StoMPP mask state (bad header): the checkpoint is corrupt or of another format.")
    code = raw[3]
    step, total, numel = (int.from_bytes(raw[4 + 8 * i : 12 + 8 * i], "little", signed=True) for i in range(3))
    if code != TRANSITIONING:
        if state.numel() != _HEADER:
            raise ValueError("StoMPP mask state has trailing bytes: the checkpoint is corrupt.")
        return code, None, step, total, numel
    if numel < 1 or state.numel() != _HEADER + (numel + 7) // 8:
        raise ValueError(
            f"StoMPP mask state of {numel} entries has {state.numel() - _HEADER} mask bytes, expected "
            f"{(numel + 7) // 8}: the checkpoint is truncated or corrupt."
        )
    mask = unpack_signs(state[_HEADER:].reshape(1, -1), numel).reshape(-1)
    return code, mask.to(state.device), step, total, numel
