"""Date helpers: days since the 2015-01-01 epoch, datetime coercion, compact acquisition timestamps."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

from terratorch_eoplugins.dates import TIMESTAMP_FORMAT, days_since_epoch, encode_times, parse_timestamp, to_datetime


def test_days_since_epoch_counts_time_of_day() -> None:
    assert days_since_epoch(dt.datetime(2015, 1, 2, 12)) == 1.5
    assert days_since_epoch(dt.date(2016, 1, 1)) == 365.0
    expected = (dt.datetime(2019, 7, 7, 18) - dt.datetime(2015, 1, 1)).days + 0.75
    assert days_since_epoch("2019-07-07T18:00:00") == pytest.approx(expected)
    # aware times count in UTC
    cet = dt.timezone(dt.timedelta(hours=1))
    assert days_since_epoch(dt.datetime(2015, 1, 2, 13, tzinfo=cet)) == 1.5


def test_to_datetime_and_encode_times() -> None:
    assert to_datetime(dt.date(2019, 7, 7)) == dt.datetime(2019, 7, 7)
    assert to_datetime("2019-07-07T10:30:00") == dt.datetime(2019, 7, 7, 10, 30)
    when = dt.datetime(2019, 7, 7, 10, 30)
    assert to_datetime(when) is when
    out = encode_times([dt.datetime(2015, 1, 2, 12), dt.datetime(2016, 1, 1)])
    assert out.dtype == torch.float64 and out.tolist() == [1.5, 365.0]


def test_parse_timestamp_round_trips_the_file_name_format() -> None:
    when = dt.datetime(2019, 7, 7, 10, 30, 31)
    assert parse_timestamp(when.strftime(TIMESTAMP_FORMAT)) == when == parse_timestamp("20190707T103031")
    with pytest.raises(ValueError):
        parse_timestamp("20191340T000000")
