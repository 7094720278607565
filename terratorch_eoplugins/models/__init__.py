"""Model families and their terratorch registrations.

Importing this package registers every backbone/decoder/neck of the plugin. Each model module lists
what it registers in a module-level ``REGISTERED = {"backbone": [...], "decoder": [...], "neck": [...]}``
so that tests and ``eoplugins registry`` can enumerate and build them.
"""

from __future__ import annotations

import importlib

#: model modules imported (and so registered) by ``import terratorch_eoplugins``
_MODULES: tuple[str, ...] = (
    "baselines",
    "s4",
    "lianet",
    "dunia",
    "tsfusion",
)

_loaded = [importlib.import_module(f"terratorch_eoplugins.models.{name}") for name in _MODULES]


def registered_names() -> dict[str, list[str]]:
    """The backbone, decoder and neck names this package adds to terratorch's registries."""
    out: dict[str, list[str]] = {"backbone": [], "decoder": [], "neck": []}
    for module in _loaded:
        for kind, names in getattr(module, "REGISTERED", {}).items():
            out[kind].extend(names)
    return out
