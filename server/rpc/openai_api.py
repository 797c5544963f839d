"""An OpenAI-compatible HTTP door to the sessions' memory (``emserve serve --openai-port P``).

Contract
--------
* ``POST /v1/completions`` (``prompt``: one string) and ``POST /v1/chat/completions`` (``messages``,
  rendered by the model's chat template) answer from a session's memory exactly as ``Generate`` does.
  The session is named by the ``x-session-id`` header, else ``metadata.session_id``, else ``user``;
  ``metadata.remember`` = ``"true"`` appends the exchange to it (``Generate``'s ``remember``).
* Sampling: ``max_tokens`` (chat: also ``max_completion_tokens``; default 64), ``temperature``
  (**default 0, greedy**, as every emserve answer; OpenAI's is 1), ``top_p``, ``seed``, ``stop`` (a string
  or a list); ``n`` must be 1. ``stream: true`` sends server-sent events (``data: {chunk}`` ... ``data:
  [DONE]``), with ``usage`` on the last chunk.
* ``GET /v1/models`` lists the one served model.
* Auth as on gRPC: ``Authorization: Bearer <token>`` (the SDK's ``api_key``) when the server has tokens,
  each call served as its token's tenant (:mod:`emserve.server.tenants`).
* Errors: OpenAI's error object ``{"error": {"message", "type", "code"}}`` with the HTTP status of the
  gRPC code the same failure gets (400, 401, 404, 409, 429, 503, 500).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from emserve.server.engine.base import SamplingError, SamplingSpec
from emserve.server.errors import InvalidArgument, Unauthenticated
from emserve.server.rpc.generation import DEFAULT_MAX_TOKENS, Chunk, Completion, GenerateParams
from emserve.server.rpc.service import SessionService, status_of
from emserve.server.tenants import bind_tenant

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) of a failure, by the gRPC status the same failure gets."""
    status = status_of(exc)
    code = status.code
    http = HTTP_STATUS.get(code, 500)
    kind = "invalid_request_error" if http < 500 else "server_error"
    return http, {"error": {"message": status.details, "type": kind, "code": code.name.lower()}}


def _session_of(headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    metadata = body.get("metadata") or {}
    sid = headers.get("x-session-id") or (metadata.get("session_id") if isinstance(metadata, Mapping) else None) \
        or body.get("user")
    if not sid:
        raise InvalidArgument("session_id", "name the session: the x-session-id header, metadata.session_id "
                              "or user")
    return str(sid)


def _params(body: Mapping[str, Any], session_id: str, prompt_ids: list[int] | None, prompt: str | None,
            max_tokens: Any) -> GenerateParams:
    if body.get("n", 1) != 1:
        raise InvalidArgument("n", "only n = 1 is served")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
    metadata = body.get("metadata") or {}
    remember = isinstance(metadata, Mapping) and str(metadata.get("remember", "")).lower() == "true"
    try:
        sampling = SamplingSpec(
            max_tokens=int(DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens),
            temperature=float(body.get("temperature") or 0.0),
            top_p=float(1.0 if body.get("top_p") is None else body["top_p"]),
            seed=None if body.get("seed") is None else int(body["seed"]))
    except SamplingError as e:  # the body's field of the same name
        raise InvalidArgument(e.field, str(e)) from None
    except (TypeError, ValueError) as e:
        raise InvalidArgument("sampling", str(e)) from None
    return GenerateParams(session_id=session_id, prompt=prompt, prompt_tokens=prompt_ids, sampling=sampling,
                          stop=stop, remember=remember)


class OpenAIDoor:
    """The endpoint's handlers over a :class:`SessionService` (its runtime, limits and tenants)."""

    def __init__(self, service: SessionService, tokens: Mapping[str, str]) -> None:
        self.service = service
        self.tokens = tokens  # token -> tenant; empty: no auth

    def tenant(self, headers: Mapping[str, str]) -> str:
        if not self.tokens:
            return ""
        got = headers.get("authorization", "").removeprefix("Bearer ")
        for token, tenant in self.tokens.items():
            if hmac.compare_digest(got.encode(), token.encode()):
                return tenant
        raise Unauthenticated("missing or wrong bearer token in the Authorization header")

    def model(self) -> str:
        rt = self.service._rt()
        return str(rt.manager.engine.info.name)

    def params(self, chat: bool, headers: Mapping[str, str], body: Mapping[str, Any]) -> GenerateParams:
        sid = _session_of(headers, body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidArgument("messages", "messages must be a non-empty list")
            ids = self.service._rt().codec.chat_messages(messages)
            return _params(body, sid, ids, None, body.get("max_completion_tokens", body.get("max_tokens")))
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt", "prompt must be one string")
        return _params(body, sid, None, prompt, body.get("max_tokens"))

    async def run(self, p: GenerateParams, tenant: str) -> AsyncIterator[Chunk | Completion]:
        bind_tenant(tenant)  # not a context manager: a streamed body may end in another context
        async for item in self.service._rt().generator.run(p):
            yield item


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    body: dict[str, Any] = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: body, "logprobs": None, "finish_reason": finish}


def _usage(c: Completion) -> dict[str, int]:
    n = len(c.token_ids)
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n, "total_tokens": c.prompt_tokens + n}


async def _events(head: dict[str, Any], chat: bool, first: Chunk | Completion,
                  items: AsyncIterator[Chunk | Completion]) -> AsyncIterator[bytes]:
    """A streamed answer as server-sent events: (chat: the role first) the text chunks, the last chunk with
    its finish reason and usage, ``[DONE]``; a failure mid-stream is an error event before ``[DONE]``."""
    chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield f"data: {json.dumps({**chunk_head, 'choices': [role]})}\n\n".encode()
    item: Chunk | Completion | None = first
    try:
        while item is not None:
            if isinstance(item, Completion):
                last = {**chunk_head, "choices": [_choice(chat, "", item.finish_reason, True)], "usage": _usage(item)}
                yield f"data: {json.dumps(last)}\n\n".encode()
            elif item.text:
                out = {**chunk_head, "choices": [_choice(chat, item.text, None, True)]}
                yield f"data: {json.dumps(out)}\n\n".encode()
            item = await anext(items, None)
    except Exception as e:  # noqa: BLE001 - mid-stream: an error event, then the end
        yield f"data: {json.dumps(_error(e)[1])}\n\n".encode()
    yield b"data: [DONE]\n\n"


def build_app(door: OpenAIDoor) -> Any:
    """The FastAPI application of the door (imported only with ``--openai-port``: FastAPI comes with vLLM)."""
    app = FastAPI(title="emserve (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

    def fail(exc: BaseException) -> JSONResponse:
        http, body = _error(exc)
        return JSONResponse(body, status_code=http)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            door.tenant(request.headers)
            name = door.model()
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error object
            return fail(e)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "emserve"}]}

    async def complete(request: Request, chat: bool) -> Any:
        try:
            tenant = door.tenant(request.headers)
            body = await request.json()
            if not isinstance(body, dict):
                raise InvalidArgument("body", "the body must be a JSON object")
            p = door.params(chat, request.headers, body)
            model = door.model()
        except json.JSONDecodeError as e:
            return fail(InvalidArgument("body", f"not JSON: {e}"))
        except Exception as e:  # noqa: BLE001
            return fail(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model}
        items = door.run(p, tenant)
        if not body.get("stream"):
            text, done = "", None
            try:
                async for item in items:
                    if isinstance(item, Completion):
                        done = item
                    else:
                        text += item.text
            except Exception as e:  # noqa: BLE001
                return fail(e)
            assert done is not None
            return {**head, "choices": [_choice(chat, done.text, done.finish_reason, False)], "usage": _usage(done)}

        try:  # the first item before the response starts: a bad session or prompt is a plain error
            first = await anext(items)
        except Exception as e:  # noqa: BLE001
            return fail(e)

        return StreamingResponse(_events(head, chat, first, items), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    return app
