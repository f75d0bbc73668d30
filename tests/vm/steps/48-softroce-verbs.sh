# Interop of the project's two RDMA providers across the wire: `fabric-pingpong` and
# `fabric-rma-bw` with `-p verbs` here (libibverbs + librdmacm over the kernel's rxe0)
# against the same tools with `-p softroce` on the host end of the TAP link (hook
# tests/vm/host/softroce-verbs, driven over TCP 192.168.100.1:5003), both roles:
# send/recv ping-pong, RMA write and RMA read, every transfer's data checked on both
# sides (--verify). Connections go through RDMA CM (the verbs provider's rdma_cm against
# softroce's IB CM over QP1). The hook captures each run on the TAP and checks every
# frame's ICRC with scapy; our device must count no bad or off-path packet (the tools
# print its counters); rxe's hw_counters are printed before and after each run.
# vmtier-timeout: 900
. /tier/lib.sh
rxe_up || fail "rxe0 is not up"
[ -e /dev/infiniband/rdma_cm ] || modprobe rdma_ucm || fail "no rdma_ucm"
for b in fabric-pingpong fabric-rma-bw; do
  command -v $b > /dev/null || fail "no $b (see tests/vm/binaries)"
done
CTL=5003

# host_result: waits (bounded) for the host run's end, prints its output, and fails
# unless it ended well (its exit status covers every check of --verify and the
# capture's scapy check) and its softroce device counted no bad or off-path packet.
host_result() {
  local r
  host_run_output; r=$HOST_OUT
  echo "$r" | grep -q '^EXIT 0$' || return 1
  echo "$r" | grep -q 'bad_packets 0 wrong_source 0 ' || { echo "(softroce dropped packets as bad or off-path)"; return 1; }
}

ok=0 bad=0 summary=""
run() { # run ROLE-OF-HOST NAME TOOL PORT ARGS...
  local role=$1 name=$2 tool=$3 port=$4 c s r
  shift 4
  echo "=== $name: host $tool -p softroce as $role, VM $tool -p verbs"
  rxe_counters before
  if [ "$role" = server ]; then
    r=$(ctl server "$tool" "$port" "$@")
    case $r in LISTENING*) ;; *) echo "host server did not start: $r"; bad=$((bad+1)); summary="$summary\n  FAIL $name, host $role (no host server)"; return;; esac
    timeout 300 $tool -p verbs -P "$port" --verify "$@" "$HOST_IP" > /tmp/sv.out 2>&1; c=$?
  else
    timeout 300 $tool -p verbs -s "$VM_IP" -P "$port" --verify "$@" > /tmp/sv.out 2>&1 &
    s=$!
    sleep 2
    r=$(ctl client "$tool" "$port" "$@")
    echo "host: $r"
    wait $s; c=$?
  fi
  echo "--- VM (verbs over kernel rxe) side: exit $c"; cat /tmp/sv.out
  if host_result && [ $c = 0 ]; then
    ok=$((ok+1)); summary="$summary\n  PASS $name, host $role"
  else
    bad=$((bad+1)); summary="$summary\n  FAIL $name, host $role"
  fi
  rxe_counters after
}

port=9400
for role in server client; do
  port=$((port + 1)); run $role pingpong fabric-pingpong $port -m sleep -S 8,64k -I 50 -w 5
  port=$((port + 1)); run $role rma-write fabric-rma-bw $port -m sleep -o write -S 4k,64k -I 50 -W 16
  port=$((port + 1)); run $role rma-read fabric-rma-bw $port -m sleep -o read -S 4k,64k -I 50 -W 16
done

printf "softroce-verbs summary: %d passed, %d failed$summary\n" $ok $bad
[ $bad = 0 ]
