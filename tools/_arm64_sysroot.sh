# Sourced by tools/arm64_python_test.sh and tools/build_wheels.sh (after tools/_steps.sh): an
# arm64 CPython from Debian's packages, unpacked into a sysroot, and an x86 script that runs it
# under qemu-aarch64. Debian ships one CPython per release: 3.9 in bullseye, 3.11 in bookworm,
# 3.13 in trixie (3.10 and 3.12 were never in a Debian release, so there is none to fetch).
#
# The host's apt state is not touched: arm64 packages are resolved with a private apt directory
# (DIR/apt), fetched once, and a second call reuses them (ARM64_PY_REFRESH=1 re-reads the
# package lists). Needs qemu-aarch64-static on the host.

# The Debian release that ships arm64 CPython VERSION.
arm64_suite_of() {
  case $1 in
    3.9) echo bullseye ;;
    3.11) echo bookworm ;;
    3.13) echo trixie ;;
    *) return 1 ;;
  esac
}

# arm64_sysroot DIR VERSION: DIR/sysroot holds Debian's arm64 CPython VERSION with its standard
# library and headers (usr/include/pythonV, usr/include/aarch64-linux-gnu/pythonV/pyconfig.h),
# libstdc++ and libgcc; DIR/bin/pythonV runs it under qemu-aarch64 (-cpu $QEMU_CPU, default
# max). CMake and the tests' subprocesses can exec that script: there is no binfmt_misc here, so
# an arm64 binary can't be exec'd directly, but qemu-user passes exec to the host kernel, which
# runs the script natively. DIR/shim: see arm64_shim.
arm64_sysroot() {
  local dir v=$2 suite a sysroot stamp qemu
  mkdir -p "$1"; dir=$(cd "$1" && pwd)  # apt reads relative Dir:: paths from /etc/apt
  suite=$(arm64_suite_of "$v") || die "no Debian release ships an arm64 CPython $v"
  a=$dir/apt sysroot=$dir/sysroot
  qemu=$(command -v qemu-aarch64-static) || die "no qemu-aarch64-static"
  mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/etc/sources.list.d" "$a/etc/preferences.d" "$a/state"
  [ -e "$a/status" ] || : > "$a/status"  # an empty dpkg status: apt resolves the whole closure
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  {
    echo "deb [arch=arm64 signed-by=$keyring] http://deb.debian.org/debian $suite main"
    echo "deb [arch=arm64 signed-by=$keyring] http://deb.debian.org/debian $suite-updates main"
    # bullseye's security updates (LTS) list arm64 packages that the mirror here answers 404
    # for: bullseye is taken at its last point release.
    [ "$suite" = bullseye ] \
      || echo "deb [arch=arm64 signed-by=$keyring] http://deb.debian.org/debian-security $suite-security main"
  } > "$a/etc/sources.list"
  local opts=(
    -o "Dir::State=$a/state" -o "Dir::State::Lists=$a/lists" -o "Dir::State::status=$a/status"
    -o "Dir::Cache=$a/cache" -o "Dir::Etc::SourceList=$a/etc/sources.list"
    -o "Dir::Etc::SourceParts=$a/etc/sources.list.d" -o "Dir::Etc::Preferences=$a/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$a/etc/preferences.d"
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o APT::Sandbox::User=root -o Debug::NoLocking=1 -o APT::Install-Recommends=0
  )
  # pythonV-minimal + libpythonV-stdlib: the interpreter and the standard library (their
  # dependencies bring libc6, libexpat1, zlib1g, libffi, libssl, libbz2, liblzma5, libsqlite3,
  # ...); libpythonV-dev: the headers; libstdc++6 + libgcc-s1: for C++ extensions.
  local debs=("python$v-minimal" "libpython$v-minimal" "libpython$v-stdlib" "libpython$v-dev" libstdc++6 libgcc-s1)
  # Before 3.10 pybind11 asks distutils.sysconfig for the extension suffix; Debian ships
  # distutils apart from the standard library.
  [ "${v#3.}" -ge 10 ] || debs+=(python3-distutils)
  if [ -n "${ARM64_PY_REFRESH:-}" ] || [ -z "$(ls "$a/lists" 2>/dev/null | grep _Packages)" ]; then
    apt-get "${opts[@]}" -q update >"$dir/apt-update.log" 2>&1 || { cat "$dir/apt-update.log"; die "apt-get update ($suite, arm64)"; }
  fi
  # Stale lists name versions the mirror no longer has: re-read them once and retry.
  apt-get "${opts[@]}" -q -y -d install "${debs[@]}" >"$dir/apt.log" 2>&1 \
    || { apt-get "${opts[@]}" -q update && apt-get "${opts[@]}" -q -y -d install "${debs[@]}" >"$dir/apt.log" 2>&1; } \
    || { cat "$dir/apt.log"; die "could not download the arm64 packages of $suite"; }
  apt-get "${opts[@]}" -q autoclean >/dev/null  # drop superseded versions from the cache
  stamp=$(cd "$a/cache/archives" && ls -- *.deb | sha256sum | cut -c1-16)
  if [ "$(cat "$sysroot/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$sysroot"; mkdir -p "$sysroot"
    for deb in "$a/cache/archives"/*.deb; do dpkg -x "$deb" "$sysroot"; done
    # trixie's packages install into usr/ only (merged /usr): the links that base-files would
    # make, so that the loader's path /lib/ld-linux-aarch64.so.1 resolves.
    for d in lib bin sbin; do
      [ -e "$sysroot/$d" ] || [ ! -d "$sysroot/usr/$d" ] || ln -s "usr/$d" "$sysroot/$d"
    done
    echo "$stamp" > "$sysroot/.stamp"
    echo "  $suite: unpacked $(ls "$a/cache/archives"/*.deb | wc -l) packages into $sysroot ($(du -sh "$sysroot" | cut -f1))"
  else
    echo "  $suite: sysroot up to date ($(ls "$a/cache/archives"/*.deb | wc -l) packages)"
  fi
  [ -x "$sysroot/usr/bin/python$v" ] || die "no $sysroot/usr/bin/python$v"
  [ -f "$sysroot/usr/include/aarch64-linux-gnu/python$v/pyconfig.h" ] || die "no arm64 pyconfig.h for $v in $sysroot"
  mkdir -p "$dir/bin"
  cat > "$dir/bin/python$v" <<EOF
#!/bin/sh
exec "$qemu" -L "$sysroot" -cpu "\${QEMU_CPU:-max}" "$sysroot/usr/bin/python$v" "\$@"
EOF
  chmod +x "$dir/bin/python$v"
  arm64_shim "$dir"
}

# arm64_shim DIR: DIR/shim/sitecustomize.py, put first on the arm64 sys.path, makes
# sys.executable the qemu wrapper named by $PYRT_ARM64_PYTHON, so that CMake and tests that
# start `sys.executable -c ...` get an arm64 interpreter too. (It shadows Debian's
# /etc/pythonV/sitecustomize.py, which only hooks apport.)
arm64_shim() {
  mkdir -p "$1/shim"
  cat > "$1/shim/sitecustomize.py" <<'PYEOF'
import os
import sys

if os.environ.get("PYRT_ARM64_PYTHON"):
    sys.executable = os.environ["PYRT_ARM64_PYTHON"]
PYEOF
}

# arm64_glibc_minor DIR: the glibc minor version of DIR's sysroot (31 for bullseye's 2.31):
# which manylinux_2_N wheels its interpreter can load.
arm64_glibc_minor() {
  local deb
  deb=$(ls "$1"/apt/cache/archives/libc6_2.*_arm64.deb | head -1) || die "no libc6 package in $1"
  basename "$deb" | sed -E 's/^libc6_2\.([0-9]+).*/\1/'
}
