"""The RPC layer: the doors through which clients reach the sessions.

Modules: ``service`` (the gRPC servicer; the only module that touches protobuf and the only place
where errors become status codes), ``ingest`` (Ingest streams: chunking, acks, commits), ``generation``
(Generate: sampling, streaming, retrieval traces), ``inspection`` (ListEvents, the surprise curve),
``text`` (text to token ids and back, incremental detokenization, stop strings), ``interceptors``
(auth, metadata, message sizes), ``openai_api`` (the OpenAI-compatible HTTP door, built on the servicer).

May import: the sessions (``emserve.server.session``), the engine's interface
(``emserve.server.engine``), the libraries, the server's leaf modules (``errors``, ``metrics``,
``tenants``, ``report``, ``logs``) and the wire (``emserve.api``, gRPC, protobuf); not the process
(``app``, ``cli``, ``config``), which builds the layer and serves it (``tests/unit/test_structure.py``).
"""
