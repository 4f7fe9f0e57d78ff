#!/usr/bin/env bash
# Install mrl-embed from a source tree into the current Python environment, the same
# way in the container image (infra/Dockerfile) and on cluster-launcher nodes
# (setup_commands in infra/aws-gpu.yaml, infra/gcp-gpu.yaml).
#
#   bash infra/install-project.sh [SRC_DIR] [EXTRAS]     # defaults: .  gpu,s3,gcs
#
# - Editable install, so a tree re-synced by `ray up` is what runs, with no reinstall.
# - faiss: faiss-cpu is a base dependency and the `gpu` extra adds faiss-gpu; both ship
#   the same `faiss` module, so with the `gpu` extra faiss-cpu is removed and faiss-gpu
#   (same version) force-reinstalled, leaving one intact GPU build (it runs on CPU too).
# - Dependencies are resolved again only when pyproject.toml or EXTRAS change (a stamp
#   in site-packages); otherwise only the editable link is refreshed, so a node that
#   boots from the prebuilt image is ready in seconds.
# - A .pth file puts SRC_DIR on sys.path, so `pipelines` (not part of the wheel) is
#   importable by drivers and Ray workers alike.
set -euo pipefail

SRC="$(cd "${1:-.}" && pwd)"
EXTRAS="${2:-gpu,s3,gcs}"
PY="${PYTHON:-python}"

site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
stamp="$site/mrl-embed-deps.sha256"
want="$({ cat "$SRC/pyproject.toml"; echo "extras=$EXTRAS"; } | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    "$PY" -m pip install --no-deps -e "$SRC"
else
    "$PY" -m pip install -e "${SRC}[${EXTRAS}]"
    if [[ ",$EXTRAS," == *",gpu,"* ]]; then
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
