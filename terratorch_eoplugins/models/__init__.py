"""Model families and their terratorch registrations.

Importing this package registers every backbone/decoder/neck of the plugin. Each module adds its
names to :data:`REGISTERED` so that tests and ``eoplugins registry`` can enumerate them.
"""

from __future__ import annotations

from terratorch_eoplugins.models import baselines  # noqa: F401  (registers unet_classic, micro_unet)

#: kind -> names registered by this package (kept in sync by each model module's registrations).
REGISTERED: dict[str, list[str]] = {
    "backbone": ["unet_classic", "micro_unet"],
    "decoder": [],
    "neck": [],
}


def registered_names() -> dict[str, list[str]]:
    """The backbone, decoder and neck names this package adds to terratorch's registries."""
    return {k: list(v) for k, v in REGISTERED.items()}
