"""sentence-transformers: binarize, train, save packed, reload and share a `SentenceTransformer`.

Nothing here is needed to train; it makes the saved model card right. The whole workflow:

* Binarize: `SentenceTransformer(path, model_kwargs={"quantization_config": StoMPPConfig()})`; its `Transformer`
  module loads the underlying Transformers model through the StoMPP quantizer.
* Train: `SentenceTransformerTrainer(..., loss=..., callbacks=[StoMPPCallback()])`, any loss. The callback drives
  the masks of the binarized layers inside the model and keeps the Trainer's checkpoints latent (resumable).
* Save and reload: after training, `model.save(path)` writes the inner model as a packed 1-bit checkpoint;
  `SentenceTransformer(path)`, with `import stompp_hf` first, rebuilds its `BinaryLinear` layers (bit-identical
  embeddings), and `encode` / `similarity` work as for any model.
* Card: sentence-transformers renders its card from the model's `model_card_data`. `use_stompp_model_card(model)`
  (called by `StoMPPCallback` when training starts) gives it a usage snippet that imports `stompp_hf` first, without
  which the packed checkpoint does not load, and the `stompp` / `binarized` / `1-bit` tags. The card data becomes
  an instance of a subclass of its own class (`StoMPPSentenceTransformerModelCardData`, no fields of its own) that
  overrides `generate_usage_snippet`, the hook sentence-transformers provides for custom snippets, so the data
  already collected (datasets, losses, training logs) stays.
"""

from __future__ import annotations

import functools

from sentence_transformers import SentenceTransformerModelCardData
from torch import nn

from .transformers.hub import TAGS

#: The line the usage snippet of a StoMPP model starts with.
IMPORT_LINE = "import stompp_hf  # registers the `stompp` quantization method: the packed 1-bit layers need it"


class StoMPPUsageSnippet:
    """Mixin for a sentence-transformers model card data class: `import stompp_hf` first in the usage snippet."""

    def generate_usage_snippet(self) -> str:
        snippet = super().generate_usage_snippet()
        if IMPORT_LINE in snippet:
            return snippet
        head, sep, body = snippet.partition("```python\n")
        return f"{head}{sep}{IMPORT_LINE}\n{body}" if sep else f"{IMPORT_LINE}\n{snippet}"


class StoMPPSentenceTransformerModelCardData(StoMPPUsageSnippet, SentenceTransformerModelCardData):
    """The card data of a StoMPP `SentenceTransformer`: its usage snippet imports `stompp_hf` first."""


@functools.cache
def _stompp_card_class(base: type) -> type:
    """`StoMPP<base>` (the card data of other model kinds, e.g. `CrossEncoder`), a module attribute so that models
    holding one pickle."""
    if base is SentenceTransformerModelCardData:
        return StoMPPSentenceTransformerModelCardData
    name = f"StoMPP{base.__name__}"
    cls = type(name, (StoMPPUsageSnippet, base), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


def use_stompp_model_card(model: nn.Module) -> bool:
    """Make the card sentence-transformers writes for `model` (at `save` / `push_to_hub`) load it with
    `import stompp_hf` and carry the StoMPP tags. Returns False (and changes nothing) for a model without a
    sentence-transformers `model_card_data`, or whose card data lacks the `generate_usage_snippet` hook."""
    data = getattr(model, "model_card_data", None)
    if data is None or not type(data).__module__.startswith("sentence_transformers"):
        return isinstance(data, StoMPPUsageSnippet)
    if not hasattr(data, "generate_usage_snippet"):
        return False
    data.__class__ = _stompp_card_class(type(data))  # a subclass without fields: the collected data stays
    data.add_tags(TAGS)
    return True
