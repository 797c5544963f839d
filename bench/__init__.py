"""bench: how emserve is measured. Not part of any distribution; run from the repository root.

* ``bench.eval``: the acceptance benchmarks (what the issues' goals are judged on: recall, the evaluation
  grid, load, decode, crash, soak, ...) and their harness (a real server, the tasks, vanilla vLLM, the
  results files and their index). Imports emserve and itself, never ``bench.lab``.
* ``bench.lab``: experiments (ablations, profiles, captures) that informed a decision; they may import the
  harness.

Every benchmark is a module run as ``python -m bench.eval.recall --quick`` (``.venv/bin/python`` in this
checkout); results go to ``bench/results/`` and are listed in ``bench/results/INDEX.md``
(``python -m bench.eval.results_index`` writes it from ``manifest.toml``).
"""
