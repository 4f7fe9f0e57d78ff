#!/usr/bin/env bash
# Install mrl-embed from a source tree into the current Python environment, the same
# way in the container image (infra/Dockerfile) and on cluster-launcher nodes
# (setup_commands in infra/aws-gpu.yaml, infra/gcp-gpu.yaml).
#
#   bash infra/install-project.sh [SRC_DIR] [EXTRAS]     # defaults: .  gpu,s3,gcs
#
# - Editable install, so a tree re-synced by `ray up` is what runs, with no reinstall.
# - faiss: EXTRAS must name exactly one of `cpu` (faiss-cpu) and `gpu` (faiss-gpu 1.15.1,
#   a CUDA 12 build, with torch < 2.11 built for the same CUDA 12.8; needs an NVIDIA
#   driver >= 570). Both wheels ship the same `faiss` module, so they are never installed
#   together; an environment that has both from an older install gets faiss-cpu removed
#   and faiss-gpu reinstalled (the GPU build runs every CPU index too).
# - Dependencies are resolved again only when pyproject.toml or EXTRAS change (a stamp
#   in site-packages); otherwise only the editable link is refreshed, so a node that
#   boots from the prebuilt image is ready in seconds.
# - A .pth file puts SRC_DIR on sys.path, so `pipelines` (not part of the wheel) is
#   importable by drivers and Ray workers alike.
set -euo pipefail

SRC="$(cd "${1:-.}" && pwd)"
EXTRAS="${2:-gpu,s3,gcs}"
PY="${PYTHON:-python}"

has() { [[ ",$EXTRAS," == *",$1,"* ]]; }
if has cpu && has gpu; then
    echo "EXTRAS names both cpu and gpu: pick one FAISS build" >&2; exit 2
elif ! has cpu && ! has gpu; then
    echo "EXTRAS must name cpu or gpu (the FAISS build), got: $EXTRAS" >&2; exit 2
fi

site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
stamp="$site/mrl-embed-deps.sha256"
want="$({ cat "$SRC/pyproject.toml"; echo "extras=$EXTRAS"; } | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    "$PY" -m pip install --no-deps -e "$SRC"
else
    "$PY" -m pip install -e "${SRC}[${EXTRAS}]"
    if has gpu && "$PY" -m pip show -q faiss-cpu 2>/dev/null; then
        # left by an older install: remove it, then restore the faiss module it overwrote
        version="$("$PY" -m pip show faiss-gpu | sed -n 's/^Version: //p')"
        "$PY" -m pip uninstall -y faiss-cpu
        "$PY" -m pip install --no-deps --force-reinstall "faiss-gpu==$version"
    fi
    echo "$want" > "$stamp"
fi
echo "$SRC" > "$site/mrl-embed-src.pth"

"$PY" - <<'PY'
import importlib.metadata as md

import faiss  # noqa: F401  (fails loudly if the faiss swap left a broken module)
import mrl_core  # noqa: F401
import pipelines  # noqa: F401

names = {d.metadata["Name"].lower() for d in md.distributions()}
assert not {"faiss-cpu", "faiss-gpu"} <= names, "faiss-cpu and faiss-gpu both installed"
print("mrl-embed ready:", md.version("mrl-embed"), "faiss", faiss.__version__)
PY
