#!/usr/bin/env bash
# Create .venv (if missing) and install detailfusion with its test extras at the versions of requirements.lock (the
# stack CI tested, every package pinned; refreshed by `bash scripts/lock.sh`, see its header), the package itself
# editable and without dependencies of its own resolving. pyproject.toml's ranges are for installs into other
# environments.
# torch is installed first, pinned, so that the package's torch range is already met and pip never swaps in a
# multi-GB CUDA build on a CPU machine. On this project's machines torch==2.13.0 resolves to a local CPU wheel;
# elsewhere set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu, or a CUDA index on GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-$(grep "^torch==" requirements.lock)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  pip install "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing requirements.lock and detailfusion (editable)"
# uv resolves and installs the same requirements in parallel (setup 3 min 39 s with pip, 1 min 38 s with uv before
# bytecode compilation, on a clean 2-core machine); the installed torch is held as a constraint so that nothing
# swaps it. Without uv on the index (UV=0 to skip it), pip does the same install.
if [ "${UV:-1}" != 0 ] && pip install "uv==${UV_VERSION:-0.13.10}" && [ -x .venv/bin/uv ]; then
  torch_pin="$(.venv/bin/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))")"
  # --compile-bytecode: pip writes every package's .pyc at install, uv does not; without them (and with
  # PYTHONDONTWRITEBYTECODE set, as on this project's machines) every Ray worker compiles torch, transformers and
  # Ray from source at import: a tiny stage's start-up went from 8 s to 20-25 s and the suite took twice as long
  uv() { .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python "$@"; }
  uv --constraint <(echo "$torch_pin") -r requirements.lock && uv --no-deps -e .
else
  pip install -r requirements.lock && pip install --no-deps -e .
fi
# The project's own bytecode too (the editable install compiles none): every Ray worker imports the package, and
# where PYTHONDONTWRITEBYTECODE is set nothing would ever write it
.venv/bin/python -m compileall -q -j 0 platform tests >/dev/null
# DeepSpeed JIT-compiles its shared-memory communication op (CPU accelerator) the first time a process group starts:
# build it here, once, so that no training stage pays for it (a no-op where the accelerator has no such op).
.venv/bin/python -c "from detailfusion.platform.train.engine import use_environment_extension_cache as cache; cache()
from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | grep -v "WARNING\|^$" || true
.venv/bin/python -c "import torch, ray, deepspeed, transformers, detailfusion; print(f'setup: ok (torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__})')"
