# Sourced by tools/arm64_python_test.sh and tools/build_wheels.sh (after tools/_steps.sh): an
# arm64 CPython in a sysroot of Debian's arm64 packages, and an x86 script that runs it under
# qemu-aarch64. Debian ships one CPython per release: 3.9 in bullseye, 3.11 in bookworm, 3.13 in
# trixie, each taken as Debian's packages. 3.10 and 3.12 were never in a Debian release: 3.10 is
# cross-compiled here from CPython's source (arm64_cpython_build) against bookworm's arm64
# libraries, and installed into the sysroot in the same layout; for 3.12 there is no source to
# be had from PyPI or Debian, so no arm64 CPython 3.12.
#
# The host's apt state is not touched: arm64 packages are resolved with a private apt directory
# (DIR/apt), fetched once, and a second call reuses them (ARM64_PY_REFRESH=1 re-reads the
# package lists); a source-built CPython is built once. Needs qemu-aarch64-static on the host,
# and for 3.10 aarch64-linux-gnu-gcc and pyenv's x86_64 CPython 3.10.

# The Debian release whose arm64 packages make VERSION's sysroot.
arm64_suite_of() {
  case $1 in
    3.9) echo bullseye ;;
    3.10|3.11) echo bookworm ;;
    3.13) echo trixie ;;
    *) return 1 ;;
  esac
}

# The source of arm64 CPython VERSION where Debian has no package of it: "PACKAGE==V SHA256 DIR",
# a PyPI sdist that carries CPython's release source tree in its DIR, and that sdist's hash.
# Nothing (status 1) for the versions Debian ships.
arm64_cpython_source() {
  case $1 in
    3.10) echo "python-sources==3.10.5 9839a22f0321faf87df966ca11620d63eb54fd832362919116c58152d9c691dc Python-3.10.5" ;;
    *) return 1 ;;
  esac
}

# arm64_sysroot DIR VERSION: DIR/sysroot holds arm64 CPython VERSION with its standard library
# and headers (usr/include/pythonV; pyconfig.h there, or in
# usr/include/aarch64-linux-gnu/pythonV for Debian's), libstdc++ and libgcc; DIR/bin/pythonV
# runs it under qemu-aarch64 (-cpu $QEMU_CPU, default max). CMake and the tests' subprocesses
# can exec that script: there is no binfmt_misc here, so an arm64 binary can't be exec'd
# directly, but qemu-user passes exec to the host kernel, which runs the script natively.
# DIR/shim: see arm64_shim.
arm64_sysroot() {
  local dir v=$2 suite a sysroot stamp qemu
  mkdir -p "$1"; dir=$(cd "$1" && pwd)  # apt reads relative Dir:: paths from /etc/apt
  suite=$(arm64_suite_of "$v") || die "no arm64 CPython $v: neither a Debian package nor a source for it"
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
  # A CPython built here: the libraries it links (zlib, which pyruntime imports; libffi, for
  # ctypes), with their headers, instead of Debian's CPython.
  arm64_cpython_source "$v" >/dev/null && debs=(libc6 zlib1g-dev libffi-dev libstdc++6 libgcc-s1)
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
  if arm64_cpython_source "$v" >/dev/null; then
    arm64_cpython_build "$dir" "$v"
    # Copied over the unpacked packages on every call: cheap, and a re-unpacked sysroot
    # gets it back.
    cp -a "$dir/cpython/usr/." "$sysroot/usr/"
  fi
  [ -x "$sysroot/usr/bin/python$v" ] || die "no $sysroot/usr/bin/python$v"
  [ -f "$sysroot/usr/include/aarch64-linux-gnu/python$v/pyconfig.h" ] || [ -f "$sysroot/usr/include/python$v/pyconfig.h" ] \
    || die "no arm64 pyconfig.h for $v in $sysroot"
  mkdir -p "$dir/bin"
  cat > "$dir/bin/python$v" <<EOF
#!/bin/sh
exec "$qemu" -L "$sysroot" -cpu "\${QEMU_CPU:-max}" "$sysroot/usr/bin/python$v" "\$@"
EOF
  chmod +x "$dir/bin/python$v"
  arm64_shim "$dir"
}

# arm64_cpython_build DIR VERSION: CPython VERSION cross-compiled for aarch64 from its source
# (arm64_cpython_source, fetched once into DIR/src) by the host's aarch64-linux-gnu-gcc, against
# the zlib and libffi of DIR/sysroot, and installed (prefix /usr) into DIR/cpython, for
# arm64_sysroot to copy into the sysroot. Built natively, not under qemu (~20x slower there).
# CPython's cross build runs a host interpreter of the same version (for the build's own Python
# steps: the extension modules, sysconfig data, bytecode): pyenv's x86_64 CPython. Modules whose
# libraries the sysroot lacks (ssl, sqlite3, tkinter, ...) are left out: the wheel builds and
# checks need none. Built once: DIR/cpython/.stamp names the source and this function's text.
arm64_cpython_build() {
  local dir=$1 v=$2 spec sha tree stamp hostpy src bld dev cfg log
  read -r spec sha tree <<<"$(arm64_cpython_source "$v")"
  stamp="$spec $sha $(declare -f arm64_cpython_build | sha256sum | cut -c1-16)"
  if [ "$(cat "$dir/cpython/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "  CPython $v (aarch64, built from ${spec/==/ }): up to date"
    return 0
  fi
  command -v aarch64-linux-gnu-gcc >/dev/null || die "no aarch64-linux-gnu-gcc to build arm64 CPython $v with"
  hostpy=$(pyenv_python "$v")
  [ -x "$hostpy/bin/python$v" ] || die "no x86_64 CPython $v under pyenv to cross-build arm64 CPython $v with"
  log=$dir/cpython-build.log
  # The source: a PyPI sdist, fetched by pip by name. pip checks its hash (--require-hashes)
  # before it runs anything of it (pip reads an sdist's metadata by running its setup.py).
  local tarball; tarball=$dir/src/${spec/==/-}.tar.gz
  if [ "$(sha256sum "$tarball" 2>/dev/null | cut -d' ' -f1)" != "$sha" ]; then
    rm -rf "$dir/src"; mkdir -p "$dir/src"
    echo "$spec --hash=sha256:$sha" > "$dir/src.req"
    "$hostpy/bin/python$v" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$dir/src.req" \
      -d "$dir/src" >"$log" 2>&1 || { cat "$log"; die "pip download $spec"; }
    [ "$(sha256sum "$tarball" 2>/dev/null | cut -d' ' -f1)" = "$sha" ] || die "$tarball: not the sdist of sha256 $sha"
  fi
  src=$dir/cpython-src bld=$dir/cpython-build dev=$dir/cpython-dev
  rm -rf "$src" "$bld" "$dir/cpython" "$dev"; mkdir -p "$src" "$bld" "$dev/include" "$dev/lib"
  tar -C "$src" -xzf "$tarball" --strip-components=2 "${spec/==/-}/$tree"
  # zlib's and libffi's headers and link-time libraries only: the sysroot's libc6-dev (a
  # dependency of both -dev packages) must not stand in for the cross compiler's own glibc.
  local s=$dir/sysroot
  ln -s "$s/usr/include/zlib.h" "$s/usr/include/zconf.h" "$s/usr/include/aarch64-linux-gnu/ffi.h" \
    "$s/usr/include/aarch64-linux-gnu/ffitarget.h" "$dev/include/"
  # The libraries by their SONAME file: the -dev packages' libX.so links can be absolute
  # (/lib/...), which would name the host's.
  local lib d
  for lib in libz.so.1 libffi.so.8; do
    for d in "$s/usr/lib/aarch64-linux-gnu" "$s/lib/aarch64-linux-gnu" ""; do
      [ -n "$d" ] || die "no $lib in $s"
      [ ! -e "$d/$lib" ] || { ln -s "$d/$lib" "$dev/lib/${lib%.*}"; break; }
    done
  done
  # What configure can't find out by running a test program on the build machine.
  cfg=$dir/config.site
  printf '%s\n' ac_cv_file__dev_ptmx=yes ac_cv_file__dev_ptc=no ac_cv_buggy_getaddrinfo=no > "$cfg"
  # -O2 without -g (CPython's default is -g -O3): less compile time, and the interpreter's
  # speed barely shows in what runs on it here. ccache where there is one.
  local cc=aarch64-linux-gnu-gcc t0; t0=$(date +%s)
  ! command -v ccache >/dev/null || cc="ccache $cc"
  echo "  CPython $v (aarch64): building from ${spec/==/ } (host interpreter $(basename "$hostpy"))"
  ( cd "$bld" && export PATH="$hostpy/bin:$PATH" CONFIG_SITE=$cfg &&
    "$src/configure" --build=x86_64-linux-gnu --host=aarch64-linux-gnu --prefix=/usr \
      --with-build-python="$hostpy/bin/python$v" --without-ensurepip --disable-test-modules \
      CC="$cc" OPT="-fwrapv -O2 -Wall" CPPFLAGS="-I$dev/include" LDFLAGS="-L$dev/lib -Wl,-rpath-link,$s/usr/lib/aarch64-linux-gnu" &&
    make -j "${JOBS:-$(nproc)}" &&
    make install DESTDIR="$dir/cpython" ) >"$log" 2>&1 || { tail -40 "$log"; die "cross-building arm64 CPython $v (log: $log)"; }
  # setup.py's lists of the modules it left out (it prints them at each of its runs).
  echo "    modules left out: $(awk '/^(The necessary bits to build these optional modules were not found|Failed to build these modules)/ {f=1; next}
    /^To find/ || NF == 0 {f=0} f' "$log" | xargs -n1 | sort -u | xargs)"
  rm -rf "$src" "$bld"
  echo "$stamp" > "$dir/cpython/.stamp"
  echo "  CPython $v (aarch64): built in $(( $(date +%s) - t0 )) s"
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
