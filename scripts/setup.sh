#!/usr/bin/env bash
# One-command setup of the whole stack into .venv (see README "Setup").
#   scripts/setup.sh            main job: system packages for FFCV, the venv, every Python dependency
#   scripts/setup.sh --test     also what only the tests need (SLURM + munge for the real-SLURM tests)
# Idempotent: every step checks first and does nothing when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

# Pinned by sha256: the registry sdist of Detectron2 v0.6 (pure Python is used; its C++ sources are absent).
D2_SDIST=pb1-detectron2==0.6
D2_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29

step() { echo "==> [setup] $*"; }
fail() { echo "!! [setup] step failed: $1" >&2; echo "!! what to do: $2" >&2; exit 1; }

# ---------------------------------------------------------------- Debian packages
MAIN_DEBS="pkg-config libopencv-dev libturbojpeg0-dev g++"
TEST_DEBS="slurmctld slurmd slurm-client munge"
want="$MAIN_DEBS"
[ $WITH_TEST = 1 ] && want="$want $TEST_DEBS"
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    step "installing Debian packages:$missing"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || fail "apt-get install$missing" "check that the Debian mirror is reachable, then re-run 'make setup'"
  else
    fail "Debian packages missing:$missing" "ask an administrator to run: apt-get install -y$missing (or load the equivalent modules), then re-run 'make setup'"
  fi
fi

# ---------------------------------------------------------------- virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV" || fail "python -m venv" "install python3.11 and python3.11-venv"
fi
VPY="$VENV/bin/python"
pipi() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# A stamp of the pinned inputs makes the second run instant; any edit of the pins re-runs the install.
STAMP="$VENV/.setup-stamp"
sum=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$sum" ] && "$VPY" -c "import torch, ffcv, detectron2, mmseg, pretrain" 2>/dev/null; then
  step "Python environment up to date ($VENV)"
else
  step "build tools (setuptools<81: Detectron2 and mmengine import pkg_resources)"
  pipi "pip==24.3.1" "setuptools==80.9.0" "wheel==0.45.1"
  step "torch 2.14.1 + torchvision 0.29.1"
  pipi torch==2.14.1 torchvision==0.29.1
  "$VPY" -c "import torchvision" || fail "torch/torchvision install" "check 'pip install torch==2.14.1 torchvision==0.29.1' works in $VENV"
  step "FFCV build prerequisites"
  pipi numpy==2.4.6 opencv-python==5.0.0.93 numba==0.68.1
  step "FFCV 1.0.2 (sdist, compiled against the system libjpeg-turbo/OpenCV)"
  "$VPY" -c "import ffcv" 2>/dev/null || pipi --no-build-isolation ffcv==1.0.2
  "$VPY" -c "import ffcv" || fail "FFCV build" "install pkg-config libopencv-dev libturbojpeg0-dev g++, then re-run"
  step "the project and its pinned dependencies (pyproject.toml)"
  pipi --no-build-isolation -e ".[test]"
  "$VPY" -c "import pretrain, mmseg, submitit" || fail "pip install -e .[test]" "read the pip error above; the pins are in pyproject.toml"
  echo "$sum" > "$STAMP.pending"
fi

# ---------------------------------------------------------------- Detectron2 (pure Python)
if "$VPY" -c "import detectron2" 2>/dev/null; then
  step "Detectron2 importable: $("$VPY" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
else
  step "Detectron2 v0.6 from the registry sdist (sha256 pinned), pure Python with a placeholder _C"
  tmp=$(mktemp -d)
  "$VPY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$tmp" "$D2_SDIST" 2>&1 | grep -v "^WARNING: Location" || true
  f=$(ls "$tmp"/*.tar.gz 2>/dev/null | head -1)
  [ -n "$f" ] || fail "download $D2_SDIST" "check that the package registry is reachable"
  echo "$D2_SHA256  $f" | sha256sum -c --quiet - || fail "sha256 of $f" "the registry served a different file than the pinned one; do not proceed"
  tar xzf "$f" -C "$tmp"
  site=$("$VPY" -c "import sysconfig;print(sysconfig.get_paths()['purelib'])")
  rm -rf "$site/detectron2"
  cp -r "$tmp"/pb1-detectron2-0.6/detectron2 "$site/detectron2"
  "$VPY" -m transfer.detection.placeholder_c > "$site/detectron2/_C.py" \
    || fail "write detectron2/_C.py" "the project package failed to import; re-run setup"
  rm -rf "$tmp"
  "$VPY" -c "import transfer.detection.compat, detectron2.modeling" || fail "import detectron2" "see the traceback above"
fi
[ -f "$STAMP.pending" ] && mv "$STAMP.pending" "$STAMP"

# ---------------------------------------------------------------- test-only: munge key for the real-SLURM tests
if [ $WITH_TEST = 1 ] && [ "$(id -u)" = 0 ] && [ ! -s /etc/munge/munge.key ] && command -v mungekey >/dev/null; then
  step "creating /etc/munge/munge.key"
  mungekey --create --force >/dev/null 2>&1 || true
fi
step "done. Activate with: source $VENV/bin/activate"
