#!/usr/bin/env python3
"""The VM tier's power-cut verdict (tests/vm/run, cuts): for each definition and run,
the ids of the `@@CUTACK NAME RUN ID ID` lines the host captured from boot RUN's serial
log before the kill, against the `@@CUTHAVE NAME RUN FIRST-LAST` ranges that boot RUN+1
printed. Usage: CUT_META="NAME.count=N NAME.expect=E ..." cutcheck.py LOGDIR NAME,NAME
Prints one line per definition: NAME PASS|FAIL ACKED LOST RUNS COUNT ERRORS; writes the
per-run details to LOGDIR/NAME.txt."""
import os, re, sys
d, cuts = sys.argv[1], sys.argv[2].split(',')
def lines(boot):
    p = os.path.join(d, 'boot-%02d.log' % boot)
    try: data = open(p, 'rb').read()
    except OSError: return []
    # Only complete lines: output the guest had not finished writing is not counted.
    data = data[:data.rfind(b'\n') + 1].decode('latin-1')
    return [l.rstrip('\r') for l in data.split('\n')]
env = dict(a.split('=', 1) for a in os.environ.get('CUT_META', '').split() if '=' in a)
for name in cuts:
    count = int(env[name + '.count']); expect = env[name + '.expect']
    acked = lost = runs = 0; errors = []; detail = []
    for run in range(1, count + 1):
        ack = re.compile(r'^@@CUTACK %s %d (\d+) (\d+)$' % (re.escape(name), run))
        ids = set(int(m.group(1)) for m in map(ack.match, lines(run)) if m and m.group(1) == m.group(2))
        nxt = lines(run + 1)
        have = re.compile(r'^@@CUTHAVE %s %d (\d+)-(\d+)$' % (re.escape(name), run))
        ranges = [(int(m.group(1)), int(m.group(2))) for m in map(have.match, nxt) if m]
        chk = [l for l in nxt if l.startswith('@@CUTCHECKED %s %d ' % (name, run))]
        if not chk or not chk[0].endswith('rc=0'):
            errors.append('run %d: check %s' % (run, chk[0].split()[-1] if chk else 'did not report'))
            continue
        if not ids:
            errors.append('run %d: no ACK seen before the cut' % run)
            continue
        missing = sorted(i for i in ids if not any(a <= i <= b for a, b in ranges))
        runs += 1; acked += len(ids); lost += len(missing)
        present = sum(b - a + 1 for a, b in ranges)
        detail.append('run %d: acked %d (max id %d), present %d in %d ranges, lost %d%s' % (
            run, len(ids), max(ids), present, len(ranges), len(missing),
            (' (first lost ids %s)' % missing[:8]) if missing else ''))
    open(os.path.join(d, name + '.txt'), 'w').write('\n'.join(detail + errors) + '\n')
    ok = not errors and runs == count and (expect == 'report' or lost == 0)
    print('%s %s %d %d %d %d %s' % (name, 'PASS' if ok else 'FAIL', acked, lost, runs, count,
                                    '; '.join(errors[:3]).replace(' ', '_') or '-'))
