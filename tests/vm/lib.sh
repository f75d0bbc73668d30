# Helpers for tests/vm/steps/*.sh (busybox sh). A step sources it: . /tier/lib.sh
# Exit status of a step: 0 pass, 77 skip (say why), anything else fail.

# Where the tier put things.
TIER_TESTS=/tier/tests      # TIER_TESTS/<package>/<target>: cargo test binaries
TIER_BIN=/tier/bin          # cargo bin targets (also on PATH)
VM_IP=192.168.100.2         # eth0
HOST_IP=192.168.100.1       # the TAP device's end in the tier's network namespace

fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }

# wait_for SECONDS CMD...: runs CMD every 0.1 s until it succeeds; false after SECONDS.
wait_for() {
  local n=$(( $1 * 10 )); shift
  while [ $n -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; n=$((n - 1)); done
  return 1
}
# listening_tcp PORT: something listens on TCP PORT.
listening_tcp() { netstat -ltn 2>/dev/null | grep -q ":$1 "; }

# gid_index DEV: index of DEV's RoCE v2 IPv4-mapped GID on port 1 (rxe lists it
# once the netdev has an IPv4 address).
gid_index() {
  local f
  for f in /sys/class/infiniband/$1/ports/1/gids/*; do
    case $(cat "$f" 2>/dev/null) in 0000:0000:0000:0000:0000:ffff:*) basename "$f"; return 0;; esac
  done
  return 1
}

# rxe_up: rdma_rxe on eth0 as rxe0 (idempotent). Steps after 10-rxe may rely on it.
rxe_up() {
  [ -e /sys/class/infiniband/rxe0 ] && return 0
  modprobe rdma_rxe && modprobe ib_uverbs && modprobe rdma_ucm || return 1
  rdma link add rxe0 type rxe netdev eth0 || return 1
  wait_for 10 gid_index rxe0
}

# run_tests PACKAGE [ARGS...]: runs every cargo test binary of PACKAGE (output kept in
# the serial log); fails if any does.
run_tests() {
  local pkg=$1 t r rc=0; shift
  [ -d "$TIER_TESTS/$pkg" ] || fail "no test binaries for $pkg in $TIER_TESTS (see tests/vm/binaries)"
  for t in "$TIER_TESTS/$pkg"/*; do
    echo "--- $pkg/$(basename "$t") $*"
    "$t" "$@" 2>&1; r=$?
    [ $r = 0 ] || { echo "^^^ $pkg/$(basename "$t") FAILED (exit $r)"; rc=1; }
  done
  return $rc
}

# This busybox prefers its applets to same-named programs on PATH; these are the real ones.
ip() { /bin/ip "$@"; }

# dax_mount: NVDIMM 0 as fsdax with ext4 mounted -o dax on /mnt/pmem (fresh file
# system; idempotent when already mounted). Step pmem-dax does the same with checks.
dax_mount() {
  grep -q ' /mnt/pmem .*dax' /proc/mounts && return 0
  modprobe nfit && modprobe nd_pmem && modprobe dax_pmem || return 1
  wait_for 20 test -e /sys/bus/nd/devices/namespace0.0 || return 1
  [ -b /dev/pmem0 ] || ndctl create-namespace -f -e namespace0.0 -m fsdax -a 2M > /dev/null || return 1
  wait_for 10 test -b /dev/pmem0 || return 1
  mkfs.ext4 -F -q -b 4096 /dev/pmem0 && mkdir -p /mnt/pmem && mount -t ext4 -o dax /dev/pmem0 /mnt/pmem &&
    grep -q ' /mnt/pmem .*dax' /proc/mounts
}

# devdax_up: NVDIMM 1 as device DAX, /dev/dax1.0 (2 MiB alignment; idempotent).
devdax_up() {
  [ -c /dev/dax1.0 ] && return 0
  modprobe nfit && modprobe nd_pmem && modprobe dax_pmem && modprobe device_dax || return 1
  wait_for 20 test -e /sys/bus/nd/devices/namespace1.0 || return 1
  ndctl create-namespace -f -e namespace1.0 -m devdax -a 2M > /dev/null || return 1
  wait_for 10 test -c /dev/dax1.0
}

# Host-hook helpers of the interop steps (softroce-rcpp, softroce-rdmacm, softroce-verbs):
# ctl LINE sends one control line to the step's hook on $HOST_IP:$CTL and prints the answer.
ctl() { echo "$*" | timeout 20 nc -w 10 "$HOST_IP" "$CTL" 2>&1; }
# rxe_counters WHEN prints rxe0's hw_counters on one line.
rxe_counters() {
  echo "rxe0 hw_counters ($1):"
  for f in /sys/class/infiniband/rxe0/ports/1/hw_counters/*; do
    printf ' %s=%s' "$(basename "$f")" "$(cat "$f")"
  done
  echo
}
# host_run_output waits (at most 300 s) for the hook's current run to end and sets
# HOST_OUT to its output (ending "EXIT <status>"); prints it.
host_run_output() {
  local n=0
  while [ $n -lt 150 ]; do
    HOST_OUT=$(ctl result)
    case $HOST_OUT in RUNNING*|"") sleep 2; n=$((n + 1));; *) break;; esac
  done
  echo "--- host (softroce) side:"; echo "$HOST_OUT"
}
