# Power cut, COMMIT: vm-cut writes 4 KiB records with COMMIT_COMPLETE over the tcp
# provider on loopback into a page-cache file mapping on the cut disk (ext4, not DAX;
# the tcp target msyncs each written range before it answers). Every acked record must
# survive the cut.
CUT_WRITE='vm-cut write --completion commit --dir "$CUT_DIR" --run "$CUT_RUN"'
CUT_CHECK='vm-cut check --dir "$CUT_DIR" --run "$CUT_RUN"'
CUT_COUNT=20
CUT_EXPECT=none-lost
CUT_NOTE="COMMIT_COMPLETE: the tcp target msyncs each record before it answers, so no acked record may be missing after a cut."
