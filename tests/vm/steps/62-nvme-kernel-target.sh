# Our NVMe-oF host against the Linux kernel's target: nvmet (configfs) here exports a
# 128 MiB file over nvmet-rdma on rxe0 (192.168.100.2:4420) to one allowed host NQN
# (ours); the hook tests/vm/host/nvmeof-host (TCP 192.168.100.1:5005) runs the project's
# `nvmeof` CLI with -t softroce and SOFTROCE_CM=ib (RDMA CM through softroce's IB CM
# over QP1) on the host end of the TAP link: discover, id-ctrl, id-ns, list-ns, list,
# reads of the pattern written here first (MD5 compared), writes up to 1 MiB read back,
# flush, write-zeroes, verify and compare (status reported). Then this step checks the
# file itself where our host wrote (the kernel's view of our writes), that the pattern
# is still intact, and dmesg since the step began: any kernel WARNING/BUG/Oops fails it.
# The hook also holds a controller idle past KATO with and without Keep Alive commands
# (the kernel must keep and end the association), and runs nvmeof-perf (random 4 KiB
# reads, two I/O queues at depth 32) against it.
# vmtier-timeout: 900
. /tier/lib.sh
rxe_up || fail "rxe0 is not up"
CTL=5005
NQN=nqn.2026-12.io.fabric.vmtier:kernel-target
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001
SIZE=$((128 << 20))
dmesg_from=$(dmesg | wc -l)

modprobe nvmet_rdma || fail "modprobe nvmet_rdma"
grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs none /sys/kernel/config || fail "configfs"
CFG=/sys/kernel/config/nvmet
S=$CFG/subsystems/$NQN
P=$CFG/ports/1
H=$CFG/hosts/$HOSTNQN
teardown() {
  rm -f "$P/subsystems/$NQN" "$S/allowed_hosts/$HOSTNQN" 2>/dev/null
  [ -d "$S/namespaces/1" ] && { echo 0 > "$S/namespaces/1/enable"; rmdir "$S/namespaces/1"; }
  rmdir "$S" "$P" "$H" 2>/dev/null
}

# The namespace's file, on ext4 (NVDIMM 0, as step pmem-dax mounts it): the kernel
# target's Write Zeroes is fallocate(ZERO_RANGE), which tmpfs lacks. Sparse, with a
# known pattern in four places (first 4 KiB, 64 KiB at 68 KiB, 1 MiB in the middle,
# the last MiB), each region's MD5 kept.
MOUNTED=0
if grep -q ' /mnt/pmem ' /proc/mounts; then
  IMG=/mnt/pmem/nvmet-ns.img BUFFERED=0
elif modprobe nfit && modprobe nd_pmem && wait_for 20 test -b /dev/pmem0 &&
     mkfs.ext4 -F -q -b 4096 /dev/pmem0 && mkdir -p /mnt/pmem && mount -t ext4 /dev/pmem0 /mnt/pmem; then
  IMG=/mnt/pmem/nvmet-ns.img BUFFERED=0 MOUNTED=1
else
  echo "(no ext4 on NVDIMM 0: the file goes on tmpfs, where the kernel cannot write zeroes)"
  IMG=/tmp/nvmet-ns.img BUFFERED=1
fi
rm -f $IMG
dd if=/dev/zero of=$IMG bs=1 count=0 seek=$SIZE 2>/dev/null || fail "create $IMG"
REGIONS=""
for r in 0:8 136:128 20480:2048 260096:2048; do # first block : blocks (512 B)
  b=${r%%:*} n=${r##*:}
  dd if=/dev/urandom of=$IMG bs=512 seek=$b count=$n conv=notrunc 2>/dev/null || fail "pattern at block $b"
  m=$(dd if=$IMG bs=512 skip=$b count=$n 2>/dev/null | md5sum | cut -d' ' -f1)
  REGIONS="$REGIONS${REGIONS:+,}$((b * 512)):$((n * 512)):$m"
done
[ "$(wc -c < $IMG)" = $SIZE ] || fail "$IMG is not $SIZE bytes"
echo "namespace file $IMG, $SIZE bytes; known regions (offset:len:md5) $REGIONS"

mkdir $S || fail "mkdir $S"
echo 0 > $S/attr_allow_any_host
echo fabric-vmtier-0001 > $S/attr_serial || fail "attr_serial"
mkdir -p $H && ln -s $H $S/allowed_hosts/$HOSTNQN || fail "allowed host $HOSTNQN"
mkdir $S/namespaces/1 || fail "namespace 1"
# tmpfs has no O_DIRECT: there the file is served through the page cache
[ $BUFFERED = 1 ] && echo 1 > $S/namespaces/1/buffered_io
echo $IMG > $S/namespaces/1/device_path && echo 1 > $S/namespaces/1/enable || fail "enable namespace 1"
mkdir $P && echo rdma > $P/addr_trtype && echo ipv4 > $P/addr_adrfam &&
  echo $VM_IP > $P/addr_traddr && echo 4420 > $P/addr_trsvcid || fail "port 1"
ln -s $S $P/subsystems/$NQN || fail "port 1 -> $NQN"
wait_for 10 sh -c "dmesg | grep -q 'nvmet_rdma: enabling port 1'" ||
  echo "(no 'enabling port 1' in dmesg yet)"
echo "nvmet: $NQN on rdma $VM_IP:4420, allowed host $HOSTNQN"

rxe_counters before
r=$(ctl run "$NQN" $SIZE "$REGIONS")
case $r in STARTED*) ;; *) teardown; fail "host hook did not start: $r";; esac
n=0 out=""
while [ $n -lt 300 ]; do # at most 600 s
  out=$(ctl result)
  case $out in RUNNING*|"") sleep 2; n=$((n + 1));; *) break;; esac
done
echo "--- host side (our nvmeof over softroce):"; echo "$out"
rxe_counters after
bad=0
echo "$out" | grep -q '^EXIT 0$' || { echo "FAIL: the host side's checks failed or it never ended"; bad=1; }

# The kernel's view of what our host wrote: the file itself.
echo "--- the namespace file, where our host wrote:"
nw=0
for line in $(echo "$out" | grep '^WROTE ' | tr ' ' ':'); do
  off=$(echo $line | cut -d: -f2) len=$(echo $line | cut -d: -f3) md5=$(echo $line | cut -d: -f4)
  # ZEROED regions lie inside a written one: those bytes changed since.
  zoff=$(echo "$out" | grep '^ZEROED ' | cut -d' ' -f2)
  zlen=$(echo "$out" | grep '^ZEROED ' | cut -d' ' -f3)
  if [ -n "$zoff" ] && [ $zoff -ge $off ] && [ $zoff -lt $((off + len)) ]; then
    have=$( { dd if=$IMG bs=512 skip=$((off / 512)) count=$(((zoff - off) / 512)) 2>/dev/null
              dd if=/dev/zero bs=512 count=$((zlen / 512)) 2>/dev/null
              dd if=$IMG bs=512 skip=$(((zoff + zlen) / 512)) count=$(((off + len - zoff - zlen) / 512)) 2>/dev/null; } | md5sum | cut -d' ' -f1)
    file=$(dd if=$IMG bs=512 skip=$((off / 512)) count=$((len / 512)) 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$have" = "$file" ] || { echo "FAIL: bytes $zoff+$zlen in the file are not zero"; bad=1; }
    echo "ok   $off+$len (zeroed $zoff+$zlen since; the rest checked with the read-back above)"
  else
    file=$(dd if=$IMG bs=512 skip=$((off / 512)) count=$((len / 512)) 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$file" = "$md5" ]; then echo "ok   $off+$len md5 $md5"; else echo "FAIL: $off+$len: file md5 $file, host wrote $md5"; bad=1; fi
  fi
  nw=$((nw + 1))
done
[ $nw -ge 5 ] || { echo "FAIL: only $nw region(s) written by our host to check"; bad=1; }
for r in $(echo $REGIONS | tr ',' ' '); do
  off=${r%%:*} rest=${r#*:}; len=${rest%%:*} md5=${rest#*:}
  file=$(dd if=$IMG bs=512 skip=$((off / 512)) count=$((len / 512)) 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$file" = "$md5" ] && echo "ok   pattern $off+$len intact" || { echo "FAIL: pattern $off+$len changed"; bad=1; }
done

echo "--- dmesg since the step began:"
dmesg | tail -n +$((dmesg_from + 1)) > /tmp/nvmet-dmesg.txt
cat /tmp/nvmet-dmesg.txt
if grep -qE 'WARNING|BUG|Oops|Call Trace|general protection' /tmp/nvmet-dmesg.txt; then
  echo "FAIL: kernel warning in dmesg"; bad=1
fi
if grep -q 'failed with status' /tmp/nvmet-dmesg.txt; then
  echo "FAIL: nvmet-rdma saw a failed work request"; bad=1
fi
grep -q 'keep-alive timer (5 seconds) expired' /tmp/nvmet-dmesg.txt ||
  { echo "FAIL: the kernel never expired the keep-alive of the controller held without Keep Alive"; bad=1; }
grep -q "nvmet: creating nvm controller .* for NQN $HOSTNQN" /tmp/nvmet-dmesg.txt ||
  { echo "FAIL: the kernel never created an NVM controller for $HOSTNQN"; bad=1; }
teardown
rm -f $IMG
[ $MOUNTED = 1 ] && umount /mnt/pmem
[ $bad = 0 ] || fail "nvme-kernel-target"
echo "nvme-kernel-target: PASS"
