"""bench.eval: the acceptance benchmarks and their harness.

Harness: ``common`` (machine record, tables, results files, Wilson intervals), ``eval_server`` (a real
``emserve serve`` process and the jobs run through it), ``eval_tasks`` / ``recall_tasks`` (haystacks and
questions), ``eval_vanilla`` (full attention on vanilla vLLM, in its own process), ``eval_report`` (tables,
plots, ``docs/results.md``), ``results_index`` (``bench/results/INDEX.md``). The rest are benchmarks,
one module each, run as ``python -m bench.eval.<name>``. Imports emserve and this package only.
"""
