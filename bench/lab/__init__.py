"""bench.lab: experiments behind the design's decisions (ablations, profiles, captures of real sessions).

Each is a module run as ``python -m bench.lab.<name>``; results are listed as experiments in
``bench/results/INDEX.md``. They build on the harness (``bench.eval``); nothing outside the lab imports them.
"""
