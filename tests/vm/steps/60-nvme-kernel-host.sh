# The Linux kernel's NVMe-oF host (nvme-rdma, driven by nvme-cli) over the guest's
# kernel rxe0 against OUR target: `nvmeof-target` (softroce, user space, rdma_cm served
# by softroce's IB CM on QP1) on the host end of the TAP link (hook
# tests/vm/host/nvmeof-target, driven over TCP 192.168.100.1:5004), serving one
# subsystem with a 256 MiB file namespace (nsid 1) and a 64 MiB memory namespace
# (nsid 2). Checked: discover (log entry fields), connect, list, id-ctrl and id-ns
# against the target's configuration; through the kernel's block devices, on both
# namespaces: O_DIRECT dd of known data at several offsets and sizes (512 B .. 1 MiB)
# read back and compared, blkdiscard then zeroes read back (DLFEAT says so), nvme
# flush, verify and copy (copied blocks read back); ext4 made, mounted, files written,
# unmounted, remounted and compared, e2fsck -fn clean; disconnect. Keep-alive: connect
# with -k 5, SIGSTOP the target, the kernel must time out and start reconnecting;
# SIGCONT, the controller must be live again and I/O work. Then 4 KiB QD1 O_DIRECT
# read latency over our target beside the kernel's nvmet (in this VM, a file of the
# same size, over rxe0 to itself). Any kernel WARNING/BUG/Oops fails the step; the
# target's log is printed at the end (and saved beside the host log by the hook).
# vmtier-timeout: 600
. /tier/lib.sh
CTL=5004 PORT=4420
SUBNQN=nqn.2024-01.io.fabric:vm-kernel-host
SERIAL=fabricvm0001 MODEL="fabric nvmeof vm"
NS1_BLOCKS=524288 NS2_BLOCKS=131072   # 256 MiB and 64 MiB in 512-byte blocks
KSUBNQN=nqn.2024-01.io.fabric:vm-kernel-nvmet KPORT=4421
W=/tmp/nkh; mkdir -p $W

rxe_up || fail "rxe0 is not up"
modprobe nvme_rdma || fail "no nvme_rdma"
command -v nvme > /dev/null || fail "no nvme (nvme-cli)"
dbase=$(dmesg | wc -l)

bad=0 summary=""
check() { # check NAME CMD...: runs CMD, records PASS/FAIL
  local n=$1; shift
  if "$@"; then summary="$summary\n  PASS $n"; else summary="$summary\n  FAIL $n"; bad=$((bad+1)); echo "^^^ FAIL: $n"; fi
}
finish() {
  echo "--- dmesg since the step began:"
  dmesg | tail -n +$((dbase + 1))
  if dmesg | tail -n +$((dbase + 1)) | grep -E 'WARNING:|BUG:|Oops|Call Trace|general protection'; then
    summary="$summary\n  FAIL kernel warning in dmesg"; bad=$((bad+1))
  fi
  echo "--- our target's log (hook):"; ctl log > $W/tlog; tail -n 200 $W/tlog
  if grep -E 'panicked|ERROR' $W/tlog; then summary="$summary\n  FAIL errors in our target's log"; bad=$((bad+1)); fi
  ctl quit
  printf "nvme-kernel-host summary: %d failed$summary\n" $bad
  [ $bad = 0 ]
  exit $?
}

r=$(ctl start)
case $r in READY*) echo "target: $r";; *) echo "$r"; fail "our target did not start";; esac

# --- discovery
nvme discover -t rdma -a $HOST_IP -s $PORT > $W/disc 2>&1; rc=$?
cat $W/disc
disc_ok() {
  [ $rc = 0 ] || return 1
  grep -q "^trtype: *rdma" $W/disc && grep -q "^subnqn: *$SUBNQN" $W/disc &&
    grep -q "^traddr: *$HOST_IP" $W/disc && grep -q "^trsvcid: *$PORT" $W/disc &&
    grep -q "^rdma_cms: *rdma-cm" $W/disc && grep -q "^adrfam: *ipv4" $W/disc &&
    grep -q "^subtype: *nvme subsystem" $W/disc
}
check "discover (trtype, subnqn, traddr, trsvcid, adrfam, subtype, rdma_cms)" disc_ok

# ctrl_of NQN: the nvmeX controller connected to NQN (first one)
ctrl_of() {
  local c
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat $c/subsysnqn 2>/dev/null)" = "$1" ] && { basename $c; return 0; }
  done
  return 1
}
# ns_dev NQN NSID: the block device (head with native multipath) of NSID of NQN
ns_dev() {
  local b
  for b in /sys/block/nvme*; do
    case ${b##*/} in *c*) continue;; esac
    [ "$(cat $b/device/subsysnqn 2>/dev/null)" = "$1" ] || continue
    [ "$(cat $b/nsid 2>/dev/null)" = "$2" ] && { echo ${b##*/}; return 0; }
  done
  return 1
}

# --- connect
nvme connect -t rdma -a $HOST_IP -s $PORT -n $SUBNQN 2>&1; rc=$?
[ $rc = 0 ] || { check "connect" false; finish; }
wait_for 20 ns_dev $SUBNQN 2 || { check "connect: both namespaces appear" false; finish; }
C=$(ctrl_of $SUBNQN); D1=$(ns_dev $SUBNQN 1); D2=$(ns_dev $SUBNQN 2)
echo "controller $C (state $(cat /sys/class/nvme/$C/state)), namespaces $D1 $D2"
check "connect: controller $C live" [ "$(cat /sys/class/nvme/$C/state)" = live ]
check "connect: transport rdma" [ "$(cat /sys/class/nvme/$C/transport)" = rdma ]
nvme list 2>&1 | tee $W/list
check "nvme list shows $D1 and $D2 with serial $SERIAL" sh -c "grep '/dev/$D1 ' $W/list | grep -q $SERIAL && grep '/dev/$D2 ' $W/list | grep -q $SERIAL"

nvme id-ctrl /dev/$C > $W/idc 2>&1; rc=$?
grep -E '^(vid|sn|mn|fr|mdts|cntlid|ver|kas|oncs|vwc|sgls|subnqn|ioccsz|iorcsz|maxcmd|nn|cntrltype) ' $W/idc
idc_ok() {
  [ $rc = 0 ] && grep -q "^sn *: $SERIAL *\$" $W/idc && grep -q "^mn *: $MODEL *\$" $W/idc &&
    grep -q "^subnqn *: $SUBNQN\$" $W/idc && grep -q "^cntrltype *: 1" $W/idc
}
check "id-ctrl (sn, mn, subnqn, cntrltype)" idc_ok
# idns DEV BLOCKS: nsze and ncap = BLOCKS, the LBA format in use has 512-byte blocks
idns() {
  nvme id-ns /dev/$1 > $W/idns-$1 2>&1 || { cat $W/idns-$1; return 1; }
  grep -E '^(nsze|ncap|nuse|flbas|dlfeat|mssrl|mcl|msrc|nlbaf)|^lbaf' $W/idns-$1
  [ $(( $(sed -n 's/^nsze *: *//p' $W/idns-$1) )) = $2 ] &&
    [ $(( $(sed -n 's/^ncap *: *//p' $W/idns-$1) )) = $2 ] &&
    grep -q '^lbaf *0 *: ms:0 *lbads:9 .*in use' $W/idns-$1 &&
    [ $(cat /sys/block/$1/size) = $2 ] && [ $(cat /sys/block/$1/queue/logical_block_size) = 512 ]
}
check "id-ns $D1 (nsze $NS1_BLOCKS, 512-byte blocks)" idns $D1 $NS1_BLOCKS
check "id-ns $D2 (nsze $NS2_BLOCKS, 512-byte blocks)" idns $D2 $NS2_BLOCKS

# --- data through the block devices
head -c 1048576 /dev/urandom > $W/pat
# rw DEV BS INDEX: writes the first BS bytes of the pattern at INDEX*BS (O_DIRECT),
# reads them back (O_DIRECT) and compares
rw() {
  head -c $2 $W/pat > $W/w
  dd if=$W/w of=/dev/$1 bs=$2 seek=$3 count=1 oflag=direct conv=notrunc 2>/dev/null || { echo "write $1 $2@$3 failed"; return 1; }
  dd if=/dev/$1 of=$W/r bs=$2 skip=$3 count=1 iflag=direct 2>/dev/null || { echo "read $1 $2@$3 failed"; return 1; }
  cmp $W/w $W/r || { echo "data differ: $1 $2 B at block $3 of $2 B"; return 1; }
  # The file namespace: the bytes in the target's file itself, read by the hook.
  if [ "$1" = "$D1" ]; then
    local h; h=$(ctl sha $(( $2 * $3 )) $2)
    [ "$h" = "$(sha256sum $W/w | cut -d' ' -f1)" ] || { echo "target file at byte $(( $2 * $3 )): sha256 $h, not what was written"; return 1; }
  fi
}
io_ok() { # io_ok DEV BLOCKS
  local d=$1 last4k=$(( $2 / 8 - 1 )) f
  for f in "512 0" "512 4097" "4096 1" "4096 $last4k" "8192 77" "65536 3" "131072 9" "1048576 5" "1048576 $(( $2 / 2048 - 1 ))"; do
    rw $d $f || return 1
  done
  echo "$d: 9 writes of 512 B .. 1 MiB at several offsets (first and last blocks included) read back equal"
  [ $d = $D1 ] && echo "$d: and each found at its offset in the target's file (sha256 by the hook)"
  return 0
}
check "O_DIRECT write/read/compare $D1" io_ok $D1 $NS1_BLOCKS
check "O_DIRECT write/read/compare $D2" io_ok $D2 $NS2_BLOCKS

# blkdiscard a range; DLFEAT read behaviour 001b means deallocated blocks read as zeroes
discard_ok() { # DEV
  local d=$1
  head -c 262144 $W/pat > $W/w
  dd if=$W/w of=/dev/$d bs=262144 seek=16 count=1 oflag=direct 2>/dev/null || return 1
  cat /sys/block/$d/queue/discard_max_bytes
  blkdiscard -o $((16 * 262144)) -l 262144 /dev/$d || { echo "blkdiscard failed"; return 1; }
  if [ $(( $(sed -n 's/^dlfeat *: *//p' $W/idns-$d) & 7 )) = 1 ]; then
    dd if=/dev/$d of=$W/r bs=262144 skip=16 count=1 iflag=direct 2>/dev/null || return 1
    head -c 262144 /dev/zero > $W/z
    cmp $W/r $W/z || { echo "$d: discarded range does not read as zeroes"; return 1; }
    if [ $d = $D1 ]; then
      [ "$(ctl sha $((16 * 262144)) 262144)" = "$(sha256sum $W/z | cut -d' ' -f1)" ] || { echo "$d: the target's file is not zero there"; return 1; }
      echo "$d: zero in the target's file too"
    fi
    echo "$d: 256 KiB discarded, read back as zeroes (dlfeat 1)"
  else
    echo "$d: 256 KiB discarded (dlfeat does not promise zeroes)"
  fi
}
check "blkdiscard $D1" discard_ok $D1
check "blkdiscard $D2" discard_ok $D2
# (through the namespace's block device: the kernel refuses I/O commands on the
# controller's character device when it has more than one namespace)
check "nvme flush ns 1" nvme flush /dev/$D1 -n 1
check "nvme flush ns 2" nvme flush /dev/$D2 -n 2
check "nvme verify $D1 (blocks 0..7)" nvme verify /dev/$D1 -n 1 -s 0 -c 7
check "nvme verify $D2 (blocks 0..7)" nvme verify /dev/$D2 -n 2 -s 0 -c 7
# copy DEV NSID: copies blocks 0..7 (written above with the pattern's first 512 B at 0
# and 4096 B at block 8..15) to block 9000, reads both back
copy_ok() {
  local d=$1
  dd if=$W/pat of=/dev/$d bs=4096 seek=0 count=2 oflag=direct 2>/dev/null || return 1
  nvme copy /dev/$d -n $2 --sdlba=9000 --slbs=0,8 --blocks=7,7 || return 1
  dd if=/dev/$d of=$W/r bs=512 skip=9000 count=16 iflag=direct 2>/dev/null || return 1
  head -c 8192 $W/pat > $W/w
  cmp $W/w $W/r || { echo "$d: copied blocks differ"; return 1; }
  echo "$d: 2 ranges of 8 blocks copied to LBA 9000, read back equal"
}
check "nvme copy $D1" copy_ok $D1 1
check "nvme copy $D2" copy_ok $D2 2

# --- a file system on the file namespace
fs_ok() {
  local d=$1 i
  mkfs.ext4 -F -q /dev/$d || return 1
  mkdir -p /mnt/nkh && mount -t ext4 /dev/$d /mnt/nkh || return 1
  for i in 1 2 3 4 5 6 7 8; do head -c $((i * 300000)) /dev/urandom > /mnt/nkh/f$i; done
  cp $W/pat /mnt/nkh/pat && mkdir /mnt/nkh/dir && echo hello > /mnt/nkh/dir/small
  (cd /mnt/nkh && md5sum f* pat dir/small) > $W/sums
  umount /mnt/nkh || return 1
  e2fsck -fn /dev/$d || { echo "e2fsck found problems"; return 1; }
  mount -t ext4 -o ro /dev/$d /mnt/nkh || return 1
  (cd /mnt/nkh && md5sum -c $W/sums) > /dev/null || { umount /mnt/nkh; echo "files differ after remount"; return 1; }
  umount /mnt/nkh
  echo "$d: ext4, 10 files written, e2fsck -fn clean, read back equal after remount"
}
check "ext4 on $D1" fs_ok $D1
check "ext4 on $D2" fs_ok $D2

nvme disconnect -n $SUBNQN 2>&1 | tee $W/disc2
disc_gone() { grep -q 'disconnected 1 controller' $W/disc2 && ! ctrl_of $SUBNQN; }
check "disconnect" disc_gone

# --- keep-alive: the target stops answering, the kernel times out and reconnects
ka_ok() {
  local c d s n t0 seen=""
  nvme connect -t rdma -a $HOST_IP -s $PORT -n $SUBNQN -k 5 --reconnect-delay 2 --ctrl-loss-tmo 60 || return 1
  wait_for 20 ns_dev $SUBNQN 2 || return 1
  c=$(ctrl_of $SUBNQN); d=$(ns_dev $SUBNQN 2)
  echo "kato $(cat /sys/class/nvme/$c/kato 2>/dev/null) s; $c $(cat /sys/class/nvme/$c/state)"
  rw $d 4096 100 || return 1
  ctl stop
  t0=$(cut -d. -f1 /proc/uptime); n=0
  while [ $n -lt 60 ]; do
    s=$(cat /sys/class/nvme/$c/state)
    case $s in live) ;; *) seen=$s; break;; esac
    sleep 1; n=$((n + 1))
  done
  echo "after SIGSTOP: state $s after $(( $(cut -d. -f1 /proc/uptime) - t0 )) s"
  [ -n "$seen" ] || { ctl cont; echo "the kernel never left live"; return 1; }
  sleep 6   # a reconnect attempt or two against the stopped target
  echo "state before SIGCONT: $(cat /sys/class/nvme/$c/state)"
  ctl cont
  t0=$(cut -d. -f1 /proc/uptime)
  wait_for 90 grep -qx live /sys/class/nvme/$c/state || { echo "not live again: $(cat /sys/class/nvme/$c/state)"; return 1; }
  echo "live again $(( $(cut -d. -f1 /proc/uptime) - t0 )) s after SIGCONT"
  dmesg | tail -n +$((dbase + 1)) | grep -iE 'keep alive|keep_alive|timeout|reconnect|resetting|error recovery' | tail -n 12 > $W/ka
  cat $W/ka
  # 6.1 reports the expired Keep Alive as an admin (QID 0) command timeout
  grep -qE 'QID 0 timeout|keep.alive' $W/ka || { echo "no keep-alive timeout in dmesg"; return 1; }
  grep -q 'Successfully reconnected' $W/ka || { echo "no reconnect in dmesg"; return 1; }
  rw $d 65536 7 && rw $(ns_dev $SUBNQN 1) 4096 200 || return 1
  nvme disconnect -n $SUBNQN
}
check "keep-alive: timeout on SIGSTOP, reconnect after SIGCONT, I/O again" ka_ok

# --- 4 KiB QD1 O_DIRECT read latency: our target beside the kernel's nvmet (in this VM)
now_us() { local t; t=$(date +%s%N 2>/dev/null); case $t in *N|"") awk '{print int($1*1000000)}' /proc/uptime;; *) echo $((t / 1000));; esac; }
# lat DEV N ROUNDS: prints the per-read latency (us) of each round, sets MED to the median
lat() {
  local i=0 t all=""
  dd if=/dev/$1 of=/dev/null bs=4k count=200 iflag=direct 2>/dev/null  # warm-up
  while [ $i -lt $3 ]; do
    t=$(now_us); dd if=/dev/$1 of=/dev/null bs=4k count=$2 skip=$((i * $2)) iflag=direct 2>/dev/null || return 1
    all="$all $(( ($(now_us) - t) / $2 ))"; i=$((i + 1))
  done
  MED=$(echo $all | tr ' ' '\n' | sort -n | sed -n "$(( ($3 + 1) / 2 ))p")
  echo "$1: $3 rounds of $2 reads, us per read:$all; median $MED us"
}
bench() {
  local k=/sys/kernel/config/nvmet ours kern
  nvme connect -t rdma -a $HOST_IP -s $PORT -n $SUBNQN || return 1
  wait_for 20 ns_dev $SUBNQN 1 || return 1
  lat $(ns_dev $SUBNQN 1) 1000 5 || return 1; ours=$MED
  nvme disconnect -n $SUBNQN
  modprobe nvmet_rdma || return 1
  grep -q configfs /proc/mounts || mount -t configfs none /sys/kernel/config || return 1
  dd if=/dev/zero of=$W/kns.img bs=1M count=0 seek=256 2>/dev/null
  mkdir $k/subsystems/$KSUBNQN && echo 1 > $k/subsystems/$KSUBNQN/attr_allow_any_host &&
    mkdir $k/subsystems/$KSUBNQN/namespaces/1 &&
    echo 1 > $k/subsystems/$KSUBNQN/namespaces/1/buffered_io &&
    echo $W/kns.img > $k/subsystems/$KSUBNQN/namespaces/1/device_path &&
    echo 1 > $k/subsystems/$KSUBNQN/namespaces/1/enable &&
    mkdir $k/ports/1 && echo rdma > $k/ports/1/addr_trtype && echo ipv4 > $k/ports/1/addr_adrfam &&
    echo $VM_IP > $k/ports/1/addr_traddr && echo $KPORT > $k/ports/1/addr_trsvcid &&
    ln -s $k/subsystems/$KSUBNQN $k/ports/1/subsystems/$KSUBNQN || return 1
  nvme connect -t rdma -a $VM_IP -s $KPORT -n $KSUBNQN || return 1
  wait_for 20 ns_dev $KSUBNQN 1 || return 1
  lat $(ns_dev $KSUBNQN 1) 1000 5 || return 1; kern=$MED
  nvme disconnect -n $KSUBNQN
  rm $k/ports/1/subsystems/$KSUBNQN; rmdir $k/ports/1
  echo 0 > $k/subsystems/$KSUBNQN/namespaces/1/enable; rmdir $k/subsystems/$KSUBNQN/namespaces/1 $k/subsystems/$KSUBNQN
  rm -f $W/kns.img
  echo "BENCH nvme-kernel-host 4KiB QD1 O_DIRECT read (dd, 5 rounds x 1000, median): ours (softroce target on the host, 256 MiB file ns) $ours us, kernel nvmet (in the VM, 256 MiB file, buffered_io, rxe0 to itself) $kern us, ratio ours/kernel $(awk "BEGIN{printf \"%.2f\", $ours/$kern}")"
}
check "latency: ours beside kernel nvmet" bench

finish
