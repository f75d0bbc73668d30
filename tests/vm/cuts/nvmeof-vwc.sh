# Power cut, NVMe-oF volatile write cache: nvmeof-powercut runs an NVMe-oF target with a
# buffered file namespace ($CUT_DIR/ns-RUN.img on the cut disk, ext4: the page cache is
# the volatile write cache the controller reports as VWC) and a host in one process over
# the tcp provider on 127.0.0.1, and writes numbered, checksummed 4 KiB records. It acks
# a record only after a FUA write (even ids) or a write followed by Flush (odd ids), which
# the target answers after fdatasync. Every acked record must survive the cut.
CUT_WRITE='nvmeof-powercut write "$CUT_DIR" "$CUT_RUN"'
CUT_CHECK='nvmeof-powercut check "$CUT_DIR" "$CUT_RUN"'
CUT_COUNT=20
CUT_EXPECT=none-lost
CUT_NOTE="A buffered file namespace reports a volatile write cache (VWC): a completion of a FUA write, or of a Flush, promises the records are durable (fdatasync on the target), so none may be lost."
