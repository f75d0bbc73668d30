# rdma_rxe: kernel soft-RoCE on the VM's NIC, visible to libibverbs.
# vmtier-timeout: 120
. /tier/lib.sh
rxe_up || fail "could not add rxe0 on eth0"
rdma link show
ibv_devices | tee /tmp/devices
grep -q rxe0 /tmp/devices || fail "ibv_devices does not list rxe0"
ibv_devinfo -d rxe0 | tee /tmp/devinfo
grep -q 'state:.*PORT_ACTIVE' /tmp/devinfo || fail "rxe0 port 1 is not active"
g=$(gid_index rxe0) || fail "rxe0 has no IPv4 GID"
echo "rxe0: RoCE v2 GID index $g = $(cat /sys/class/infiniband/rxe0/ports/1/gids/$g)"
