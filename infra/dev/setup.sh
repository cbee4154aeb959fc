#!/usr/bin/env bash
# Set up dino-cluster on a Debian machine with Python 3.11: system packages, then a virtual
# environment in .venv with the project installed (editable).
#
#   bash infra/dev/setup.sh          # what the quickstart needs
#   bash infra/dev/setup.sh --test   # plus what the test suite needs (services, test tools)
#
# torch: by default `pip install torch==2.14.1 torchvision==0.29.1` from PyPI (a CUDA build on
# x86_64 Linux; it runs on CPU too). For a small CPU-only build set, before running this:
#   DINO_TORCH_PIP_ARGS="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
# The venv sees the system site-packages, so a torch already installed system-wide is reused.
set -euo pipefail
cd "$(dirname "$0")/../.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"

apt_pkgs=(dataset-fashion-mnist)
if [ "$want_tests" = 1 ]; then
  # The services the integration tests start on loopback: a one-machine SLURM cluster with
  # accounting (infra/slurm/dev-cluster.sh) and Prometheus (promtool for the alert rules).
  apt_pkgs+=(slurm-wlm munge slurmdbd mariadb-server prometheus)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "[setup] Python >= 3.11 is required ($python is $("$python" --version))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python" -m venv --system-site-packages .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch, torchvision' >/dev/null 2>&1; then
  echo "[setup] installing torch (${DINO_TORCH_PIP_ARGS:-torch==2.14.1 torchvision==0.29.1})"
  # shellcheck disable=SC2086
  "${pip[@]}" install ${DINO_TORCH_PIP_ARGS:-torch==2.14.1 torchvision==0.29.1}
fi
extras=""
[ "$want_tests" = 1 ] && extras="[dev]"
echo "[setup] installing dino-cluster${extras}"
"${pip[@]}" install -e ".${extras}"
echo "[setup] done: $(.venv/bin/dino-cluster --help >/dev/null && echo 'dino-cluster ok')"
