"""A worker's Recorder on its own: where each request lands in the histogram (sockd.counters)."""

from __future__ import annotations

import bisect
import itertools
import time

from sockd.config.schema import DEFAULT_BUCKETS
from sockd.counters import Recorder


def test_each_request_lands_in_the_bucket_bisect_would_give() -> None:
    """The first bucket's count kept apart and the scan for the others place every request where
    bisect places it: midway between bounds, and past the last (+Inf)."""
    recorder = Recorder(DEFAULT_BUCKETS)
    middles = [DEFAULT_BUCKETS[0] / 2]
    middles += [(low + high) / 2 for low, high in itertools.pairwise(DEFAULT_BUCKETS)]
    middles += [DEFAULT_BUCKETS[-1] * 2]
    expected = [0] * (len(DEFAULT_BUCKETS) + 1)
    for elapsed in middles:
        recorder.request(1, 1, time.monotonic() - elapsed)
        expected[bisect.bisect_left(DEFAULT_BUCKETS, elapsed)] += 1
    totals = recorder.totals()
    assert totals.buckets == expected
    assert (totals.requests, totals.received, totals.sent) == (len(middles), len(middles), len(middles))
