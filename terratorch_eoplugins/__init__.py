"""terratorch-eoplugins: recent EO models and benchmark datasets as terratorch plugins.

Importing this package registers every backbone, decoder and neck in terratorch's registries
(terratorch has no entry-point discovery, so the import is what makes the names resolvable).
"""

from __future__ import annotations

__version__ = "0.1.0"

from terratorch_eoplugins import datamodules, datasets, models  # noqa: F401,E402  (registration side effects)

__all__ = ["__version__", "datamodules", "datasets", "models"]
