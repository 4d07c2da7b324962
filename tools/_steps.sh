# Sourced by the long test and build scripts (arm64_python_test.sh, x86_compat_test.sh,
# build_wheels.sh): section banners, per-phase wall-clock timings and their table, the one-line
# failure message, an apt install of whichever host tools are missing, and which pyenv
# CPython serves a version.
# Set STEP_NAME (the script's name in messages) and STEP_WIDTH (the timing table's name column)
# before sourcing; the run's clock starts here.

T_START=$(date +%s)
T_LAST=$T_START
TIMINGS=()
section() { echo; echo "================ $* ================"; }
phase_done() {  # phase_done NAME: record the seconds since the previous phase ended
  local now; now=$(date +%s)
  TIMINGS+=("$(printf '%-*s %5d s' "$STEP_WIDTH" "$1" $((now - T_LAST)))")
  T_LAST=$now
}
print_timings() {
  echo "timings (wall clock):"
  printf '  %s\n' "${TIMINGS[@]}"
  printf '  %-*s %5d s\n' "$STEP_WIDTH" total $(( $(date +%s) - T_START ))
}
die() { echo "$STEP_NAME: FAILED: $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "$STEP_NAME: FAILED (exit $rc) after $(( $(date +%s) - T_START )) s" >&2' EXIT

# apt_install_missing PACKAGE...: apt-get install the packages named (nothing when none are).
apt_install_missing() {
  (($#)) || return 0
  echo "apt-get install $*"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@"
}

# pyenv_python 3.X: the root of the newest pyenv CPython 3.X (nothing if there is none).
pyenv_python() {
  local root; root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  # (|| true: with no match, ls's status would end the script under pipefail before the
  # caller can say which version is missing)
  { ls -d "$root/versions/$1".* 2>/dev/null || true; } | sort -V | tail -1
}
