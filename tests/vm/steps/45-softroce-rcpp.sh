# Interop with kernel rxe: ibv_rc_pingpong here (rxe0, event mode) against
# `fabric-pingpong --rc-pingpong -p softroce` on the host end of the TAP link (hook
# tests/vm/host/softroce-rcpp, driven over TCP 192.168.100.1:5001), both roles,
# 64 B to 64 KiB, path MTU 1024 and (eth0 and the TAP at MTU 9000) 4096. Our side
# checks every byte it receives (the stock program echoes what it got) and prints its
# device's counters: bad_packets and wrong_source must be 0. The hook captures each
# run on the TAP (both directions) and checks every frame's ICRC with scapy (rxe's with
# their real IP IDs); a bad one fails the run. rxe's hw_counters are printed before and
# after each run.
# vmtier-timeout: 900
. /tier/lib.sh
rxe_up || fail "rxe0 is not up"
g=$(gid_index rxe0) || fail "rxe0 has no IPv4 GID"
CTL=5001 PORT=18515

# host_result ITERS: waits (bounded) for the host run's end; prints its output; fails
# unless it ended well, verified ITERS messages and counted no bad or off-path packet.
host_result() {
  local r
  host_run_output; r=$HOST_OUT
  echo "$r" | grep -q '^EXIT 0$' || return 1
  echo "$r" | grep -q "verified $1 of $1 received" || { echo "(not every message verified)"; return 1; }
  echo "$r" | grep -q 'bad_packets 0 wrong_source 0 ' || { echo "(softroce dropped packets as bad or off-path)"; return 1; }
}

ok=0 bad=0 summary=""
run() { # run ROLE-OF-HOST SIZE MTU ITERS
  local role=$1 size=$2 mtu=$3 iters=$4 c s r
  echo "=== host softroce $role, VM ibv_rc_pingpong, size $size, MTU $mtu, $iters iterations"
  rxe_counters before
  if [ "$role" = server ]; then
    r=$(ctl server "$size" "$iters" "$mtu" $PORT)
    case $r in LISTENING*) ;; *) echo "host server did not start: $r"; bad=$((bad+1)); summary="$summary\n  FAIL host $role $size B MTU $mtu (no host server)"; return;; esac
    timeout 300 ibv_rc_pingpong -d rxe0 -g "$g" -e -s "$size" -m "$mtu" -n "$iters" -p $PORT "$HOST_IP" > /tmp/ibv.out 2>&1; c=$?
  else
    timeout 300 ibv_rc_pingpong -d rxe0 -g "$g" -e -s "$size" -m "$mtu" -n "$iters" -p $PORT > /tmp/ibv.out 2>&1 &
    s=$!
    wait_for 20 listening_tcp $PORT || { kill $s; cat /tmp/ibv.out; bad=$((bad+1)); summary="$summary\n  FAIL host $role $size B MTU $mtu (ibv server did not listen)"; return; }
    r=$(ctl client "$size" "$iters" "$mtu" $PORT)
    echo "host: $r"
    wait $s; c=$?
  fi
  echo "--- VM (kernel rxe, ibv_rc_pingpong) side: exit $c"; cat /tmp/ibv.out
  if host_result "$iters" && [ $c = 0 ] && grep -q 'iters in' /tmp/ibv.out; then
    ok=$((ok+1)); summary="$summary\n  PASS host $role $size B MTU $mtu: $(grep 'iters in' /tmp/ibv.out)"
  else
    bad=$((bad+1)); summary="$summary\n  FAIL host $role $size B MTU $mtu"
  fi
  rxe_counters after
}

for size in 64 1024 4096 65536; do
  iters=200; [ $size = 65536 ] && iters=50
  run server $size 1024 $iters
  run client $size 1024 $iters
done

# Path MTU 4096 needs frames of 4096 + 58 bytes: jumbo frames on both ends of the link.
if [ "$(ctl mtu 9000)" = OK ] && ip link set eth0 mtu 9000; then
  wait_for 5 sh -c 'ibv_devinfo -d rxe0 | grep -q "active_mtu:.*4096"'
  ibv_devinfo -d rxe0 | grep -E 'active_mtu|max_mtu'
  for size in 4096 65536; do
    iters=200; [ $size = 65536 ] && iters=50
    run server $size 4096 $iters
    run client $size 4096 $iters
  done
  ip link set eth0 mtu 1500; ctl mtu 1500 > /dev/null
else
  bad=$((bad+1)); summary="$summary\n  FAIL MTU 4096: could not set MTU 9000 on the link"
fi

printf "softroce-rcpp summary: %d passed, %d failed$summary\n" $ok $bad
[ $bad = 0 ]
