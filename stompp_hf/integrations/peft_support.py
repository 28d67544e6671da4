"""When a packed model is loaded: let peft put LoRA adapters on its packed layers (`integrations.peft`), without
importing peft where it is not installed."""

from __future__ import annotations

import importlib.util


def enable_peft_support() -> None:
    """Register the packed layers' LoRA layers with peft (`stompp_hf.integrations.peft.register_with_peft`), so that
    plain `get_peft_model`, `PeftModel.from_pretrained`, `model.load_adapter` and `pipeline(model=adapter_dir)` work
    on the model just loaded. Does nothing where peft is not installed (then no peft call can need it)."""
    if importlib.util.find_spec("peft") is None:
        return
    from .peft import register_with_peft

    register_with_peft()
