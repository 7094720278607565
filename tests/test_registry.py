"""Registration: every name this package registers builds from a fresh interpreter after one import."""

from __future__ import annotations

import json
import subprocess
import sys

from terratorch_eoplugins.models import registered_names

SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import terratorch_eoplugins
from terratorch.registry import BACKBONE_REGISTRY, DECODER_REGISTRY, NECK_REGISTRY
from terratorch_eoplugins.models import registered_names
out = {}
for kind, names in registered_names().items():
    for name in names:
        if kind == "backbone":
            m = BACKBONE_REGISTRY.build(name)
            out[name] = list(m.out_channels)
        elif kind == "decoder":
            m = DECODER_REGISTRY.build(name, [64, 64, 64, 64])
            out[name] = [m.out_channels]
        else:
            m = NECK_REGISTRY.build(name, [64, 64, 64, 64])
            out[name] = []
print(json.dumps(out))
"""


def test_every_registered_name_builds_in_a_fresh_interpreter() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {n for names in registered_names().values() for n in names}
    assert set(built) == expected and expected
    assert all(isinstance(c, int) and c > 0 for chans in built.values() for c in chans)


def test_names_follow_the_registry_conventions() -> None:
    names = [n for ns in registered_names().values() for n in ns]
    assert len(names) == len(set(names))
    for n in names:
        assert n == n.lower(), n
        # a timm_/smp_/terratorch_ first token would be routed to another registry source
        assert not n.startswith(("timm_", "smp_", "terratorch_")), n


def test_names_do_not_resolve_without_the_import() -> None:
    """Documents terratorch's lack of entry-point discovery: the import is what registers."""
    code = ("import warnings; warnings.filterwarnings('ignore');"
            "from terratorch.registry import BACKBONE_REGISTRY;"
            "before = 'micro_unet' in BACKBONE_REGISTRY;"
            "import terratorch_eoplugins;"
            "print(before, 'micro_unet' in BACKBONE_REGISTRY)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False True"
