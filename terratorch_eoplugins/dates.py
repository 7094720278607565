"""Date and time helpers shared by the datasets and the models.

* Continuous time values are days since :data:`TIME_EPOCH` (2015-01-01 00:00 UTC, the Sentinel-2 era), time
  of day included as a fraction (LIANet's time input, the region acquisitions of the S2 tile datasets).
* Acquisition timestamps in file names are compact ISO strings, ``YYYYMMDDTHHMMSS`` (:data:`TIMESTAMP_FORMAT`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TIMESTAMP_FORMAT", "TIME_EPOCH", "days_since_epoch", "encode_times", "parse_timestamp", "to_datetime"]

#: Origin of the continuous time value.
TIME_EPOCH = dt.datetime(2015, 1, 1)
#: ``strftime``/``strptime`` format of acquisition timestamps in file names (``20190707T103031``).
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%S"


def to_datetime(when: dt.datetime | dt.date | str) -> dt.datetime:
    """``when`` as a :class:`~datetime.datetime`: a date becomes its midnight, a string is read as ISO 8601."""
    if isinstance(when, str):
        return dt.datetime.fromisoformat(when)
    if isinstance(when, dt.datetime):
        return when
    return dt.datetime(when.year, when.month, when.day)


def days_since_epoch(when: dt.datetime | dt.date | str) -> float:
    """Days (with fraction of day) from 2015-01-01 00:00 to ``when`` (aware times are converted to UTC)."""
    when = to_datetime(when)
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return (when - TIME_EPOCH).total_seconds() / 86400.0


def encode_times(times: Sequence[dt.datetime]) -> Tensor:
    """Days since 2015-01-01 of ``times`` as a float64 tensor."""
    return torch.tensor([days_since_epoch(t) for t in times], dtype=torch.float64)


def parse_timestamp(stamp: str) -> dt.datetime:
    """The time of a compact ``YYYYMMDDTHHMMSS`` stamp; raises ``ValueError`` if it is not a valid one."""
    return dt.datetime.strptime(stamp, TIMESTAMP_FORMAT)
