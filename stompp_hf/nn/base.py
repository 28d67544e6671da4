"""`StoMPPModule`: the state and inspection API every StoMPP training module shares (docs/design.md, "Training with
Trainer"): its binarizers, their stages, masks and frozen fractions."""

from __future__ import annotations

import torch

from .binarizer import Binarizer


class StoMPPModule:
    """Base of `StoMPPLinear`, `StoMPPConv2d` (weight and input binarizers) and `StoMPPActivation` (input only).

    Each binarized tensor has its own stage (`Binarizer.stage`); with `granularity="block"` or `"module"` the tensors
    of one module share it, with `"layer"` every weight and every activation has its own (Algorithm 2).
    """

    weight_binarizer: Binarizer | None
    input_binarizer: Binarizer | None

    def binarizers(self) -> list[Binarizer]:
        """The binarized tensors of this module: weight, then input (the order `ProgressionController` numbers them
        in, which seeds their mask draws)."""
        return [b for b in (self.weight_binarizer, self.input_binarizer) if b is not None]

    @property
    def stompp_stage(self) -> int:
        """The stage of this module: that of its first scheduled tensor (all of them unless `granularity="layer"`)."""
        return min(b.stage for b in self.binarizers())

    @stompp_stage.setter
    def stompp_stage(self, stage: int) -> None:
        for b in self.binarizers():
            b.stage = int(stage)

    def stompp_device(self) -> torch.device:
        """Where this module's masks live (the device of its parameters or buffers)."""
        for tensor in (*self.parameters(), *self.buffers()):  # type: ignore[attr-defined]
            return tensor.device
        return torch.device("cpu")

    @property
    def fully_frozen(self) -> bool:
        """True when every binarized tensor of this module is frozen to sign (the module can be packed)."""
        return all(b.committed for b in self.binarizers())

    def _mask_of(self, binarizer: Binarizer | None) -> torch.Tensor | None:
        if binarizer is None or binarizer.mask is None:
            return None
        return binarizer.mask.tensor(self.stompp_device())

    @property
    def weight_mask(self) -> torch.Tensor | None:
        """Bool tensor of the weight's shape (True = frozen to sign), or None where weights stay full precision."""
        return self._mask_of(self.weight_binarizer)

    @property
    def input_mask(self) -> torch.Tensor | None:
        """Bool tensor of the per-sample input shape, or None where inputs are not binarized (or not yet seen)."""
        return self._mask_of(self.input_binarizer)

    @property
    def weight_frozen_fraction(self) -> float | None:
        b = self.weight_binarizer
        return None if b is None else b.frozen_fraction

    @property
    def input_frozen_fraction(self) -> float | None:
        b = self.input_binarizer
        return None if b is None else b.frozen_fraction
