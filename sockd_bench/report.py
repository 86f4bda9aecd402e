"""What `sockd bench` computes and shows from what the client processes measured: the latency
histogram and the tallies that merge, percentiles, the summary (`--json`), the text tables and
the verdict (warnings and the exit status)."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sockd_bench.client import Load

BITS = 10  # the latency histogram's precision: 1/2**BITS of a value
PERCENTILES = {"p50": 500, "p90": 900, "p99": 990, "p99_9": 999}  # JSON key: permille
BUSY = 0.9  # the share of their time the client processes may compute before they are the bottleneck


class Histogram:
    """Latencies in nanoseconds, each kept to within 1/1024 of its value (HdrHistogram's idea): a
    few thousand counters at most however many requests, so a client process's result stays small."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def record(self, ns: int) -> None:
        # Below 2**BITS ns every value has its own bucket; above, the top BITS bits of the value pick
        # one of 2**(BITS-1) buckets per power of two, none wider than 1/2**(BITS-1) of its values.
        if ns < 1 << BITS:
            index = ns
        else:
            shift = ns.bit_length() - BITS
            index = (shift << (BITS - 1)) + (ns >> shift)
        self.counts[index] = self.counts.get(index, 0) + 1

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count

    def percentiles_us(self) -> dict[str, float | None]:
        """PERCENTILES in microseconds (None without a single sample); the nearest-rank method,
        so a higher percentile is never below a lower one."""
        indices = sorted(self.counts)
        cumulative = list(itertools.accumulate(self.counts[index] for index in indices))
        total = cumulative[-1] if cumulative else 0
        shown: dict[str, float | None] = {}
        for key, permille in PERCENTILES.items():
            rank = -(-total * permille // 1000)  # ceiling, in integers: no rounding at 99.9
            found = indices[bisect.bisect_left(cumulative, max(rank, 1))] if total else None
            shown[key] = None if found is None else round(_midpoint(found) / 1000, 1)
        return shown


def _midpoint(index: int) -> float:
    if index < 1 << BITS:
        return float(index)
    shift = (index >> (BITS - 1)) - 1
    low = (index - (shift << (BITS - 1))) << shift
    return low + ((1 << shift) - 1) / 2


@dataclasses.dataclass
class Tally:
    """What client processes measured; tallies of several processes add up."""

    requests: int = 0
    unanswered: int = 0  # connections that never got an answer, or never connected
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: Histogram = dataclasses.field(default_factory=Histogram)
    cpu: float = 0.0  # CPU seconds the processes used while the load ran
    wall: float = 0.0  # the sum of their run times
    elapsed: float = 0.0  # the longest run

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.unanswered += other.unanswered
        self.errors += other.errors
        self.latencies.merge(other.latencies)
        self.cpu += other.cpu
        self.wall += other.wall
        self.elapsed = max(self.elapsed, other.elapsed)


def summary(load: Load, tally: Tally) -> dict[str, Any]:
    """The result as `--json` prints it."""
    return {
        "target": load.target.url,
        "mode": load.mode,
        "connections": load.connections,
        "size": load.size,
        "duration": round(tally.elapsed, 3),
        "processes": min(load.processes, load.connections),
        "requests": tally.requests,
        "requests_per_second": round(tally.requests / tally.elapsed, 1) if tally.elapsed else 0.0,
        "latency_us": tally.latencies.percentiles_us(),
        "errors": sum(tally.errors.values()),
        "unanswered": tally.unanswered,
    }


def verdict(load: Load, tally: Tally, label: str = "") -> int:
    """Warnings on stderr, one line each; the exit status: 1 when not one request succeeded."""
    errors = sum(tally.errors.values())
    kinds = ", ".join(f"{why}: {count}" for why, count in tally.errors.most_common())
    if tally.requests == 0:
        if errors:
            warn(f"{label}no request succeeded: {errors} errors ({kinds})")
        else:
            warn(f"{label}no request completed within {tally.elapsed:g} s")
        return 1
    if errors:
        warn(f"{label}{errors} errors ({kinds})")
    if tally.unanswered:
        warn(
            f"{label}{tally.unanswered} of {load.connections} connections never got an answer: the server "
            "serves fewer connections at once (an iterative one serves one), or has stopped answering"
        )
    if tally.wall and tally.cpu >= BUSY * tally.wall:
        warn(
            f"{label}the client processes were on a CPU {tally.cpu / tally.wall:.0%} of the run: the client is "
            "probably the bottleneck, not the server (more --processes may help if cores are idle)"
        )
    return 0


def warn(text: str) -> None:
    """One line on stderr, under the command's name."""
    print(f"sockd bench: {text}", file=sys.stderr, flush=True)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(report: dict[str, Any]) -> str:
    """A `summary` as a person reads it, one figure a line."""
    rows: list[tuple[str, object]] = [
        ("target", report["target"]),
        ("mode", report["mode"]),
        ("connections", report["connections"]),
        ("size", f"{report['size']} bytes"),
        ("duration", f"{report['duration']:.2f} s"),
        ("processes", report["processes"]),
        ("requests", f"{report['requests']:,}"),
        ("requests/s", f"{report['requests_per_second']:,.1f}"),
    ]
    rows += [
        (key.replace("_", "."), _us(value) + " µs" * (value is not None)) for key, value in report["latency_us"].items()
    ]
    rows.append(("errors", report["errors"]))
    rows.append(("unanswered", f"{report['unanswered']:,} of {report['connections']:,} connections"))
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def models_table(caption: str, reports: list[dict[str, Any]]) -> str:
    """`--models`'s summaries, a row per model under `caption`."""
    header = f"{'model':<12} {'requests/s':>12} {'p50 (µs)':>12} {'p99 (µs)':>12} {'errors':>8} {'unanswered':>10}"
    lines = [caption, header]
    for report in reports:
        latency = report["latency_us"]
        lines.append(
            f"{report['model']:<12} {report['requests_per_second']:>12,.1f} "
            f"{_us(latency['p50']):>12} {_us(latency['p99']):>12} {report['errors']:>8} {report['unanswered']:>10}"
        )
    return "\n".join(lines)
