"""Time encodings of LIANet: a vector per acquisition time, added to the spatial hash features.

Time values are days since :data:`~terratorch_eoplugins.dates.TIME_EPOCH` (2015-01-01 00:00 UTC, the
Sentinel-2 era; :func:`~terratorch_eoplugins.dates.days_since_epoch`), time of day included as a fraction, as
in the reference implementation. Modes:

* ``index``: one learned vector per pretraining acquisition (``nn.Embedding(Q, D)``, N(0, 0.02));
  takes the acquisition index, so it cannot represent unseen dates.
* ``sinusoidal``: fixed angular frequencies ``2**0 .. 2**(K-1)`` (rad/day) applied to ``t``, sin and
  cos, then ``Linear(2K, D)``.
* ``fourier_learned``: like ``sinusoidal`` with ``K`` learnable frequencies initialised ``N(0, 1)``
  (the mode of the reference PASTIS/BurnScars checkpoints).
* ``mlp``: ``[t, sin(annual phase), cos(annual phase)]`` through a 3-layer GELU MLP (hidden 64). The annual
  phase is, as in the reference (``Pretraining/src/dataset.py:_get_dt_properties``), ``2 pi (doy - 1) / 365`` with
  ``doy`` the calendar day of year (1..366) of the acquisition's date, i.e. on whole days (``mlp_phase="doy"``);
  ``mlp_phase="year_fraction"`` keeps the project's earlier continuous ``2 pi frac(t / 365.2425)`` (differs from the
  reference by up to 0.020 rad).

``time_scale`` divides ``t`` before the continuous encodings (1 = raw days, the reference).
"""

from __future__ import annotations

import datetime as dt
import math

import torch
from torch import Tensor, nn

from terratorch_eoplugins.dates import TIME_EPOCH

__all__ = ["MLP_PHASES", "TIME_MODES", "TimeEncoding", "day_of_year"]

TIME_MODES = ("index", "sinusoidal", "fourier_learned", "mlp")
MLP_PHASES = ("doy", "year_fraction")
_YEAR = 365.2425
# days from TIME_EPOCH to 1 January of each year 1970..2200 (lookup for the calendar day of year)
_FIRST_YEAR = 1970
_YEAR_STARTS = torch.tensor([(dt.datetime(y, 1, 1) - TIME_EPOCH).days for y in range(_FIRST_YEAR, 2201)],
                            dtype=torch.int64)


def day_of_year(t: Tensor) -> Tensor:
    """Calendar day of year (1..366, int64) of the date ``floor(t)`` days after 2015-01-01 (1970..2200)."""
    day = torch.floor(t.double()).to(torch.int64)
    starts = _YEAR_STARTS.to(day.device)
    if day.numel() and (int(day.min()) < int(starts[0]) or int(day.max()) >= int(starts[-1]) + 365):
        raise ValueError("time values must lie between 1970 and 2200 to compute a day of year")
    idx = torch.searchsorted(starts, day, right=True) - 1
    return day - starts[idx] + 1


class TimeEncoding(nn.Module):
    """Map times ``[B]`` (days since 2015-01-01, or acquisition indices for ``index``) to ``[B, out_dim]``.

    Args:
        mode: one of :data:`TIME_MODES`.
        out_dim: output size (``L * F`` of the hash encoding it is added to).
        num_timestamps: ``Q`` learned vectors (``index`` mode).
        num_frequencies: ``K`` frequencies (``sinusoidal``, ``fourier_learned``).
        hidden_dim: hidden width of the ``mlp`` mode.
        time_scale: ``t / time_scale`` feeds the continuous modes.
        mlp_phase: annual phase of the ``mlp`` mode: ``"doy"`` (reference, ``(doy - 1) / 365`` on whole days) or
            ``"year_fraction"`` (``frac(t / 365.2425)``, the project's earlier formula).
        index_init_std: standard deviation of the ``index`` embedding's normal initialisation (0.02 in the
            reference's ``release/v1.0.1`` code, 1e-3 in v1.0.0's season embedding).
    """

    def __init__(self, mode: str = "fourier_learned", out_dim: int = 1664, num_timestamps: int | None = None,
                 num_frequencies: int = 8, hidden_dim: int = 64, time_scale: float = 1.0, mlp_phase: str = "doy",
                 index_init_std: float = 0.02) -> None:
        super().__init__()
        if mode not in TIME_MODES:
            raise ValueError(f"time mode must be one of {TIME_MODES}, got {mode!r}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if mlp_phase not in MLP_PHASES:
            raise ValueError(f"mlp_phase must be one of {MLP_PHASES}, got {mlp_phase!r}")
        self.mode, self.out_dim, self.time_scale = mode, int(out_dim), float(time_scale)
        self.mlp_phase = mlp_phase
        if mode == "index":
            if not num_timestamps or num_timestamps < 1:
                raise ValueError("time mode 'index' needs num_timestamps >= 1 (number of pretraining acquisitions)")
            self.num_timestamps = int(num_timestamps)
            self.embedding = nn.Embedding(self.num_timestamps, out_dim)
            nn.init.normal_(self.embedding.weight, std=float(index_init_std))
        elif mode in ("sinusoidal", "fourier_learned"):
            if num_frequencies < 1:
                raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
            freqs = 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
            if mode == "sinusoidal":
                self.register_buffer("frequencies", freqs)
            else:
                self.frequencies = nn.Parameter(torch.randn(num_frequencies))
            self.proj = nn.Linear(2 * num_frequencies, out_dim)
            nn.init.normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)
        else:
            self.mlp = nn.Sequential(nn.Linear(3, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                     nn.Linear(hidden_dim, out_dim))
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)

    @property
    def needs_index(self) -> bool:
        """Whether :meth:`forward` takes acquisition indices rather than day values."""
        return self.mode == "index"

    def forward(self, t: Tensor) -> Tensor:
        """Encode ``t`` ``[B]`` into ``[B, out_dim]``."""
        if t.ndim != 1:
            raise ValueError(f"time input must be a 1-D tensor [B], got shape {tuple(t.shape)}")
        if self.mode == "index":
            if t.is_floating_point():
                raise ValueError("time mode 'index' takes integer acquisition indices, got floating-point values")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timestamps):
                raise ValueError(f"acquisition index out of range 0..{self.num_timestamps - 1}: "
                                 f"got {int(t.min())}..{int(t.max())}")
            return self.embedding(t)
        x = t.float() / self.time_scale
        if self.mode == "mlp":
            if self.mlp_phase == "doy":
                phase = 2 * math.pi * ((day_of_year(t) - 1).double() / 365.0)
            else:
                phase = 2 * math.pi * torch.remainder(t.double() / _YEAR, 1.0)
            # sin/cos in float64 then float32, as the reference's per-sample Python math
            return self.mlp(torch.stack([x, torch.sin(phase).float(), torch.cos(phase).float()], dim=1))
        angles = x[:, None] * self.frequencies[None, :]
        return self.proj(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))

