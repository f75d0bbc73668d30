# Interop with kernel rxe over RDMA CM: rdma-core's rping here (rxe0, librdmacm, the
# kernel's rdma_cm and IB CM on QP1) against `fabric-rping` (softroce, IB CM over its
# own QP1 with rdma_cm's header) on the host end of the TAP link (hook
# tests/vm/host/softroce-rdmacm, driven over TCP 192.168.100.1:5002), both roles, data
# verified on both sides (-V), 64 B, 4000 B and 65000 B pings. Our side prints its
# device's and IB CM's counters: bad_packets and wrong_source must be 0, and no MAD
# malformed. The hook captures each run on the TAP (both directions, QP1's MADs
# included) and checks every frame's ICRC with scapy; rxe's hw_counters are printed
# before and after each run.
# vmtier-timeout: 900
. /tier/lib.sh
rxe_up || fail "rxe0 is not up"
[ -e /dev/infiniband/rdma_cm ] || modprobe rdma_ucm || fail "no rdma_ucm"
command -v rping > /dev/null || fail "no rping (rdmacm-utils)"
CTL=5002 PORT=7174

# host_result COUNT: waits (bounded) for the host run's end; prints its output; fails
# unless it ended well, verified COUNT pings and counted no bad or off-path packet
# and no malformed MAD.
host_result() {
  local r
  host_run_output; r=$HOST_OUT
  echo "$r" | grep -q '^EXIT 0$' || return 1
  echo "$r" | grep -q "$1 pings of .* $1 verified" || { echo "(not every ping verified)"; return 1; }
  echo "$r" | grep -q 'bad_packets 0 wrong_source 0 ' || { echo "(softroce dropped packets as bad or off-path)"; return 1; }
  echo "$r" | grep -q 'ibcm_malformed 0 ' || { echo "(softroce's IB CM dropped malformed MADs)"; return 1; }
}

ok=0 bad=0 summary=""
run() { # run ROLE-OF-HOST SIZE COUNT
  local role=$1 size=$2 count=$3 c s r
  echo "=== host fabric-rping $role, VM rping, size $size, $count pings"
  rxe_counters before
  if [ "$role" = server ]; then
    r=$(ctl server "$size" "$count" $PORT)
    case $r in LISTENING*) ;; *) echo "host server did not start: $r"; bad=$((bad+1)); summary="$summary\n  FAIL host $role $size B (no host server)"; return;; esac
    timeout 300 rping -c -a "$HOST_IP" -p $PORT -S "$size" -C "$count" -V -v > /tmp/rping.out 2>&1; c=$?
  else
    timeout 300 rping -s -a "$VM_IP" -p $PORT -S "$size" -V > /tmp/rping.out 2>&1 &
    s=$!
    # rdma_cm listens without a socket: give it a moment to bind.
    sleep 2
    r=$(ctl client "$size" "$count" $PORT)
    echo "host: $r"
    wait $s; c=$?
  fi
  echo "--- VM (kernel rxe, rping) side: exit $c"; tail -n 5 /tmp/rping.out
  if host_result "$count" && [ $c = 0 ]; then
    ok=$((ok+1)); summary="$summary\n  PASS host $role $size B x $count"
  else
    bad=$((bad+1)); summary="$summary\n  FAIL host $role $size B x $count"
  fi
  rxe_counters after
}

for size in 64 4000 65000; do
  count=20; [ $size = 65000 ] && count=5
  run server $size $count
  run client $size $count
done

printf "softroce-rdmacm summary: %d passed, %d failed$summary\n" $ok $bad
[ $bad = 0 ]
