"""Tenants: bearer tokens mapped to names, each seeing only its own sessions.

Contract
--------
* A tenants file (``--tenants-file``, JSON ``{"tenant": "token", ...}``) gives each tenant its token; the
  server's single ``--auth-token``, if set too, is the token of the unnamed tenant ``""``, which also owns
  every session created without tenants.
* Every call is served as one tenant (:func:`tenant_context`, bound from the call's token by the service);
  the session manager keeps a tenant's sessions in folders of their own (``<tenant>~<session id>``), so
  another tenant's session is NOT_FOUND in every RPC (ListSessions included) and an id is free per tenant.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from emserve.retrieval.errors import ConfigError

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEPARATOR = "~"  # in no session id: a tenant's folders are "<tenant>~<session id>"

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("emserve_tenant", default="")


def current_tenant() -> str:
    """The tenant the current call is served as ("" without tenants)."""
    return _tenant.get()


@contextlib.contextmanager
def tenant_context(tenant: str) -> Iterator[None]:
    token = _tenant.set(tenant)
    try:
        yield
    finally:
        _tenant.reset(token)


def bind_tenant(tenant: str) -> None:
    """Serve the rest of the current task as ``tenant`` (a task per call: its context is its own)."""
    _tenant.set(tenant)


def folder_name(session_id: str, tenant: str) -> str:
    """Where session ``session_id`` of ``tenant`` lives under the sessions root."""
    return f"{tenant}{SEPARATOR}{session_id}" if tenant else session_id


def split_folder(name: str) -> tuple[str, str]:
    """(tenant, session id) of a session folder's name."""
    tenant, sep, sid = name.partition(SEPARATOR)
    return (tenant, sid) if sep else ("", name)


def load_tenants(path: str | None, auth_token: str | None) -> dict[str, str]:
    """Token -> tenant, from the tenants file and the server's auth token (the tenant ""). Raises
    ConfigError on a bad file: names not matching :data:`TENANT_NAME`, blank or repeated tokens."""
    tokens: dict[str, str] = {}
    if auth_token:
        tokens[auth_token] = ""
    if path is None:
        return tokens
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"tenants_file {path!r}: {e}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"tenants_file {path!r}: expected a JSON object of tenant names to tokens")
    for name, token in raw.items():
        if not TENANT_NAME.fullmatch(str(name)):
            raise ConfigError(f"tenants_file: tenant name {str(name)[:64]!r} must match {TENANT_NAME.pattern}")
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(f"tenants_file: the token of tenant {name!r} must be a non-blank string")
        if token in tokens:
            raise ConfigError(f"tenants_file: tenant {name!r} shares its token with another tenant")
        tokens[token] = str(name)
    return tokens
