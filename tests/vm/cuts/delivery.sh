# Power cut, the control: the same writer with DELIVERY_COMPLETE (placed in the
# mapping's page cache, no msync). What it loses is what COMMIT exists to keep.
CUT_WRITE='vm-cut write --completion delivery --dir "$CUT_DIR" --run "$CUT_RUN"'
CUT_CHECK='vm-cut check --dir "$CUT_DIR" --run "$CUT_RUN"'
CUT_COUNT=20
CUT_EXPECT=report
CUT_NOTE="DELIVERY_COMPLETE promises the bytes are in the target's memory (here its page cache), not that they are durable: the records not yet written back at the cut are lost. That is what COMMIT_COMPLETE exists for."
