# The host<->VM link later host-side tests use (softroce on the host against this
# kernel's rxe): eth0 is a TAP device whose host end, 192.168.100.1, lives in a network
# namespace the tier made; host hooks (tests/vm/host/*) run there. No NAT, no slirp:
# frames pass unchanged, so the RoCE ICRC holds.
# vmtier-timeout: 60
. /tier/lib.sh
ping -c 3 -W 2 "$HOST_IP" || fail "no ICMP answer from the host end $HOST_IP"
reply=$(echo "hello from $VM_IP" | timeout 10 nc -w 5 "$HOST_IP" 5000) || true
echo "tcp echo from the host hook: '$reply'"
[ "$reply" = "hello from $VM_IP" ] || fail "the host hook tests/vm/host/echo did not answer on $HOST_IP:5000"
