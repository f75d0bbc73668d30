# Power cut, NVMe-oF volatile write cache, the control: the same workload as nvmeof-vwc,
# but each record is acked at the completion of a plain write (no FUA, no Flush), which
# only promises the data reached the target's page cache. The cut shows what is lost.
CUT_WRITE='nvmeof-powercut write --no-flush "$CUT_DIR" "$CUT_RUN"'
CUT_CHECK='nvmeof-powercut check "$CUT_DIR" "$CUT_RUN"'
CUT_COUNT=20
CUT_EXPECT=report
CUT_NOTE="A plain write completion promises only that the data reached the target's volatile write cache (its page cache): the records not yet written back at the cut are lost. That is what Flush and FUA exist for."
