#!/usr/bin/env bash
# Set up a development environment on Debian or Ubuntu with Python 3.10+:
# the system libraries Open3D needs, and a virtual environment in .venv with the
# package, the ROS 2 Jazzy wheels, the HAWQ tool's PyTorch and the test tools.
#
#   bash scripts/setup.sh            # everything
#   VENV=/path/to/venv bash scripts/setup.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

apt_packages=(libgl1 libgomp1 libusb-1.0-0 python3-venv)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[ros,hawq,test]"
echo "Environment ready in $VENV"
