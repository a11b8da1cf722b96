"""``make bench``: the performance figures of issue #8, measured against a real gunicorn.

Not a test: it prints a table and writes ``bench-results.json``. Every number comes from one run on
one machine, so the targets are ratios within that run (claim cost at 50,000 pending against 100,
HTTP cycles against the raw store) plus the absolute goals the issue sets.
"""
