"""Deprecated: this module moved (see `stompp_hf._deprecation.OLD_MODULES`); it forwards for one release."""

from ._deprecation import forward

__getattr__, __dir__ = forward(__name__)
