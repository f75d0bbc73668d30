# The pmem crate's tests on real DAX: the emulated NVDIMM 0 as fsdax with ext4 mounted
# -o dax (PMEM_TEST_DIR, PMEM_TEST_DAX=1: MAP_SYNC must succeed, is_pmem() must be true),
# NVDIMM 1 as device DAX (PMEM_TEST_DEVDAX).
# vmtier-timeout: 480
. /tier/lib.sh
modprobe nfit && modprobe nd_pmem && modprobe dax_pmem && modprobe device_dax || fail "modules"
wait_for 20 test -e /sys/bus/nd/devices/namespace1.0 || fail "the NVDIMMs have no namespaces"
# Label-less NVDIMMs start as raw namespaces (no struct pages: no DAX); give them a
# pfn/dax info block. Both devices are fresh files every boot.
ndctl create-namespace -f -e namespace0.0 -m fsdax -a 2M > /tmp/ns0.json || fail "fsdax namespace"
ndctl create-namespace -f -e namespace1.0 -m devdax -a 2M > /tmp/ns1.json || fail "devdax namespace"
grep -hE '"(dev|mode|size|align|blockdev|chardev)"' /tmp/ns0.json /tmp/ns1.json
wait_for 10 test -b /dev/pmem0 || fail "no /dev/pmem0"
wait_for 10 test -c /dev/dax1.0 || fail "no /dev/dax1.0"
d=$(cat /sys/bus/nd/devices/region*/persistence_domain 2>/dev/null | sort -u | tr '\n' ' ')
echo "persistence domain: ${d:-not published (no eADR)}"
echo "device DAX alignment: $(cat /sys/dev/char/$(stat -c '%t:%T' /dev/dax1.0 | awk -F: '{printf "%d:%d", "0x"$1, "0x"$2}')/align 2>/dev/null || echo '?')"
mkfs.ext4 -F -q -b 4096 /dev/pmem0 || fail "mkfs.ext4"
mkdir -p /mnt/pmem
mount -t ext4 -o dax /dev/pmem0 /mnt/pmem || fail "mount -o dax: $(dmesg | tail -2)"
grep ' /mnt/pmem ' /proc/mounts
grep -q ' /mnt/pmem .*dax' /proc/mounts || fail "mounted without dax"
PMEM_TEST_DIR=/mnt/pmem PMEM_TEST_DAX=1 PMEM_TEST_DEVDAX=/dev/dax1.0 run_tests pmem --test-threads=2
rc=$?
# The positive assertions are live: the same expectation on tmpfs (no DAX) must fail.
if PMEM_TEST_DIR=/tmp PMEM_TEST_DAX=1 "$TIER_TESTS/pmem/mapping" --exact \
     dax_file_system_gives_map_sync_and_is_pmem > /tmp/control.out 2>&1; then
  cat /tmp/control.out; echo "control: PMEM_TEST_DAX=1 on tmpfs passed: the DAX assertions check nothing"; rc=1
else
  echo "control: PMEM_TEST_DAX=1 on tmpfs fails as it must: $(grep -m1 -o 'assertion.*' /tmp/control.out)"
fi
umount /mnt/pmem
exit $rc
