#!/usr/bin/env python3
"""Verify every RoCEv2 frame of a pcap with scapy's contrib.roce (independent ICRC).

Usage: check_pcap.py CAPTURE.pcap [MIN_PACKETS]
Prints one summary line; exits 1 if any ICRC disagrees or a frame is not RoCEv2.
"""

import sys
from collections import Counter

from scapy.all import IP, UDP, raw, rdpcap
from scapy.contrib.roce import BTH


def main():
    path = sys.argv[1]
    minimum = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    bad = 0
    ops = Counter()
    pkts = rdpcap(path)
    for i, pkt in enumerate(pkts):
        if IP not in pkt:
            # LINKTYPE_RAW frames may come back undecoded: decode as IPv4.
            pkt = IP(raw(pkt))
        if BTH not in pkt or pkt[UDP].dport != 4791:
            print(f"frame {i}: not RoCEv2: {pkt.summary()}")
            bad += 1
            continue
        stored = pkt[BTH].icrc
        again = pkt[IP].copy()
        del again[BTH].icrc
        computed = IP(raw(again))[BTH].icrc
        ops[pkt[BTH].opcode] += 1
        if stored != computed:
            print(f"frame {i}: ICRC {stored:#010x} != scapy {computed:#010x}")
            bad += 1
    summary = " ".join(f"{op:#04x}:{n}" for op, n in sorted(ops.items()))
    print(f"scapy checked {len(pkts)} frames, {bad} bad; opcodes {summary}")
    if bad or len(pkts) < minimum:
        sys.exit(1)


if __name__ == "__main__":
    main()
