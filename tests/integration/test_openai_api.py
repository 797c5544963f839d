"""The OpenAI-compatible endpoint, driven by the real ``openai`` SDK (unmodified) over HTTP, against a
server on the HF reference engine and the tiny model (given a chat template here): the answers equal
gRPC Generate's for the same prompt (greedy), streaming or not; sessions, remember, auth and errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from grpc_harness import ServerThread, random_ids, tiny_config

from emserve.client import Client
from emserve.server.engine.reference import ReferenceEngine

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a chat template (it has none)."""
    d = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model_dir, d)
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    return d


@pytest.fixture
def srv(chat_model: Path, tmp_path: Path) -> Iterator[ServerThread]:
    engine = ReferenceEngine(str(chat_model), dtype="float32", log_dtype="float32", max_model_len=1024)
    s = ServerThread(tiny_config(chat_model, tmp_path / "sessions", openai_port=0, auth_token="sekret"), engine)
    yield s
    s.stop()


def _sdk(srv: ServerThread, key: str = "sekret") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server.openai_port}/v1", api_key=key, max_retries=0)


def test_the_openai_sdk_answers_from_a_session_as_generate_does(srv: ServerThread) -> None:
    grpc_client = Client(srv.address, token="sekret", timeout=60)
    grpc_client.create_session("book")
    grpc_client.ingest_text("book", "The lighthouse keeper counted ships. " * 30)
    sdk = _sdk(srv)
    model = sdk.models.list().data[0].id
    prompt = "The keeper counted"
    got = sdk.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                 extra_headers={"x-session-id": "book"})
    assert got.choices[0].text == grpc_client.ask("book", prompt, max_tokens=12).text
    assert got.usage is not None and got.usage.completion_tokens <= 12
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True, user="book"))
    assert streamed == got.choices[0].text
    # chat: the messages in the model's template, as Generate with chat_template renders one user turn
    chat = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who counted?"}],
                                       max_tokens=10, temperature=0, metadata={"session_id": "book"})
    assert chat.choices[0].message.content == grpc_client.ask("book", "Who counted?", max_tokens=10,
                                                              chat_template=True).text
    parts = [c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who counted?"}], max_tokens=10, temperature=0,
        stream=True, metadata={"session_id": "book"})]
    assert "".join(parts) == chat.choices[0].message.content
    # nothing was remembered; with metadata.remember the exchange is appended
    n = grpc_client.get_session("book").num_tokens
    sdk.completions.create(model=model, prompt=prompt, max_tokens=4, user="book")
    assert grpc_client.get_session("book").num_tokens == n
    sdk.completions.create(model=model, prompt=prompt, max_tokens=4, user="x",
                           extra_body={"metadata": {"session_id": "book", "remember": "true"}})
    assert grpc_client.get_session("book").num_tokens > n
    grpc_client.close()


def test_errors_are_openai_error_objects(srv: ServerThread) -> None:
    with Client(srv.address, token="sekret", timeout=60) as c:
        c.create_session("s")
        c.ingest_tokens("s", random_ids(40, 1))
    sdk = _sdk(srv)
    with pytest.raises(openai.AuthenticationError):
        _sdk(srv, key="wrong").completions.create(model="m", prompt="x", user="s")
    with pytest.raises(openai.NotFoundError) as e:
        sdk.completions.create(model="m", prompt="x", user="nobody")
    assert "nobody" in str(e.value)
    with pytest.raises(openai.BadRequestError):  # no session named
        sdk.completions.create(model="m", prompt="x")
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="m", prompt="x", user="s", temperature=1e9)
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="m", prompt="x", user="s", n=2)
    with pytest.raises(openai.NotFoundError):  # streaming: the error comes before the stream starts
        list(sdk.completions.create(model="m", prompt="x", user="nobody", stream=True))
