# ibv_rc_pingpong server and client inside the VM over rxe0 (RC SEND, event mode: with
# busy polling on both ends, rxe's softirq work waits for timer ticks under TCG).
# vmtier-timeout: 180
. /tier/lib.sh
rxe_up || fail "rxe0 is not up"
g=$(gid_index rxe0) || fail "rxe0 has no IPv4 GID"
rc=0
for args in "-n 200" "-e -s 4096 -n 500"; do
  # shellcheck disable=SC2086
  timeout 90 ibv_rc_pingpong -d rxe0 -g "$g" $args > /tmp/server.out 2>&1 &
  server=$!
  wait_for 20 listening_tcp 18515 || { kill $server; cat /tmp/server.out; fail "server did not listen"; }
  # shellcheck disable=SC2086
  timeout 90 ibv_rc_pingpong -d rxe0 -g "$g" $args 127.0.0.1 > /tmp/client.out 2>&1; c=$?
  wait $server; s=$?
  echo "--- ibv_rc_pingpong $args: server exit $s, client exit $c"
  cat /tmp/server.out /tmp/client.out
  [ $c = 0 ] && [ $s = 0 ] && grep -q 'iters in' /tmp/client.out || rc=1
done
exit $rc
