"""DUNIA's DPT-style decoder: per-level shapes and channel widths."""

from __future__ import annotations

import pytest
import torch

from terratorch_eoplugins.nn.dpt import DPTDecoder


def test_levels_have_dp_times_two_power_channels_and_resolution() -> None:
    torch.manual_seed(0)
    dec = DPTDecoder(dim=32, out_dim=8, patch_size=8, num_levels=4, na_kernel=5, na_heads=1)
    taps = [torch.randn(2, 32, 3, 5) for _ in range(4)]  # 24 x 40 image, P = 8
    out = dec(taps)
    for d, o in enumerate(out):
        assert o.shape == (2, 8 * 2**d, 24 // 2**d, 40 // 2**d)
    # the deepest tap changes every level (fusion goes deep -> shallow)
    taps2 = [t.clone() for t in taps]
    taps2[3] += 1.0
    dec.eval()
    with torch.no_grad():
        a, b = dec(taps), dec(taps2)
    assert all(not torch.allclose(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="4 encoder taps"):
        dec(taps[:3])


def test_downsampling_levels_when_patch_is_small() -> None:
    dec = DPTDecoder(dim=16, out_dim=4, patch_size=2, num_levels=4, na_kernel=3, na_heads=1)
    out = dec([torch.randn(1, 16, 8, 8) for _ in range(4)])  # 16 x 16 image, P = 2: level 3/4 are strided convs
    assert [tuple(o.shape[-2:]) for o in out] == [(16, 16), (8, 8), (4, 4), (2, 2)]
