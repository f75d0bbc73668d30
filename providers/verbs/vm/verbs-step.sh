#!/bin/sh
# The verbs provider over kernel soft-RoCE, run INSIDE a VM (the project's VM tier)
# with rdma_rxe available:
#   1. fabric-conformance -p verbs (every case; the suite listens on 127.0.0.1, which
#      rdma_cm binds to an RDMA device of its choice: rxe0 here);
#   2. fabric-pingpong -p verbs, server and client over rxe0's IPv4 address;
#   3. fabric-rma-bw -p verbs, write and read, server and client over rxe0.
# Needs: the binaries fabric-conformance, fabric-pingpong, fabric-rma-bw built with
# `--features fabric-conformance/verbs,fabric-examples/verbs` (in $VERBS_BIN, default
# /tier/bin, else $PATH); libibverbs.so.1, librdmacm.so.1, the rxe provider
# (libibverbs/librxe-rdmav34.so + /etc/libibverbs.d/rxe.driver) and glibc; the
# rdma_rxe module; iproute2's `rdma` (or the tier's rxe_up).
# Waiting mode: `-m sleep` (under TCG busy polling on both ends starves rxe's softirq
# work until timer ticks). Prints a summary line per part and exits non-zero on any
# failure.
# vmtier-timeout: 900
set -u
if [ -f /tier/lib.sh ]; then
  . /tier/lib.sh
else
  fail() { echo "FAIL: $*"; exit 1; }
  rxe_up() {
    rdma link show 2>/dev/null | grep -q rxe0 && return 0
    modprobe rdma_rxe || return 1
    dev=$(ip -o -4 addr show | awk '$2 != "lo" {print $2; exit}')
    [ -n "$dev" ] && rdma link add rxe0 type rxe netdev "$dev"
  }
fi
BIN=${VERBS_BIN:-/tier/bin}
[ -x "$BIN/fabric-conformance" ] || BIN=$(dirname "$(command -v fabric-conformance 2>/dev/null || echo /nonexistent/x)")
for b in fabric-conformance fabric-pingpong fabric-rma-bw; do
  [ -x "$BIN/$b" ] || fail "$b not found (set VERBS_BIN)"
done
rxe_up || fail "rxe0 is not up"
ip4=$(ip -o -4 addr show | awk '$2 != "lo" {split($4, a, "/"); print a[1]; exit}')
[ -n "$ip4" ] || fail "no IPv4 address on the VM's interface"
echo "verbs step: rxe0 on $ip4"

passed=0; failed=0
part() { # name, exit status
  if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "PASS verbs/$1"
  else failed=$((failed + 1)); echo "FAIL verbs/$1 (exit $2)"; fi
}

# 1. Conformance.
timeout 600 "$BIN/fabric-conformance" -p verbs --case-timeout 60 > /tmp/verbs-conformance.out 2>&1
rc=$?
cat /tmp/verbs-conformance.out
# All skipped (no device found) is a failure too.
grep -q ' 0 failed' /tmp/verbs-conformance.out && ! grep -q '^0 passed' /tmp/verbs-conformance.out || { [ "$rc" = 0 ] && rc=1; }
part conformance "$rc"

# Server in the background, client in the foreground; both exit codes count.
pair() { # name, tool, port, extra args...
  name=$1; tool=$2; port=$3; shift 3
  timeout 240 "$BIN/$tool" -p verbs -s "$ip4" -P "$port" -m sleep "$@" > "/tmp/$name.server" 2>&1 &
  srv=$!
  sleep 2
  timeout 240 "$BIN/$tool" -p verbs -P "$port" -m sleep "$@" "$ip4" > "/tmp/$name.client" 2>&1
  c=$?
  wait $srv; s=$?
  echo "--- $name: server exit $s, client exit $c"
  cat "/tmp/$name.client"
  [ $s = 0 ] && [ $c = 0 ]; part "$name" $?
}

# 2. Ping-pong (figures are TCG-emulated: not comparable with host numbers).
pair pingpong fabric-pingpong 9328 -S 8,4k,64k -I 200 -w 20
# 3. RMA bandwidth.
pair rma-bw-write fabric-rma-bw 9329 -o write -S 4k,64k -I 500 -W 16
pair rma-bw-read fabric-rma-bw 9330 -o read -S 4k,64k -I 500 -W 16

echo "verbs: $passed passed, $failed failed"
[ "$failed" = 0 ]
