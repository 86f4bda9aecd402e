"""Benchmarking sockd, kept out of the daemon's package: the daemon never imports it.

`sockd bench` (also `sockd-bench`), a load generator for one's own sockd: runner.py (the command
line and --models), client.py (the client processes), report.py (what is shown of the results).
`make bench`, the tables of the README's Performance section: suite.py, with serve.py and relay.py
as the servers it hands to bench/compare.py, footprint.py (`make bench-footprint`), memory and
start-up, which needs nothing from bench/, and healthz.py, /healthz's answers under a saturating
load.
"""
