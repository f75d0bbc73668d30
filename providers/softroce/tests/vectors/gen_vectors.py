#!/usr/bin/env python3
"""Generate RoCEv2 test vectors with scapy's contrib.roce (an independent ICRC).

scapy's RoCE layer defines BTH (with ICRC computation) and AETH only; the other
extension headers (RETH, ImmDt, AtomicETH, DETH) are packed here with `struct` as raw
bytes after the BTH, which scapy then covers with its ICRC.

Output: scapy_vectors.txt, one vector per line:
    name|<IPv4 frame as hex>|key=value,key=value,...
The key/value pairs are the values the packet was built from (all integers in hex
except payload, which is hex bytes) plus `icrc`, scapy's ICRC as read back from the
built frame (the big-endian reading of the four trailing bytes, as scapy reports it).

Run: python3 gen_vectors.py > scapy_vectors.txt   (needs `pip install scapy`)
"""

import struct
import sys

from scapy.all import IP, UDP, Ether, Raw, raw, import_hexcap  # noqa: F401
from scapy.contrib.roce import AETH, BTH

SRC = "192.168.10.1"
DST = "192.168.10.2"


def frame(name, bth_fields, ext=b"", payload=b"", aeth=None, ip_id=0, df=True,
          ttl=64, tos=0, sport=0xC123, fields=None):
    pad = (4 - len(payload) % 4) % 4
    ip = IP(src=SRC, dst=DST, id=ip_id, flags="DF" if df else 0, ttl=ttl, tos=tos)
    bth = BTH(padcount=pad, **bth_fields)
    pkt = ip / UDP(sport=sport, dport=4791, chksum=0) / bth
    if aeth is not None:
        pkt = pkt / AETH(syndrome=aeth[0], msn=aeth[1])
    # scapy appends the ICRC itself (BTH.icrc is an FCS field placed at the end).
    pkt = pkt / Raw(ext + payload + b"\x00" * pad)
    data = raw(pkt)
    # Re-parse: scapy fills the ICRC in post_build; read it back as scapy sees it.
    back = IP(data)
    icrc = back[BTH].icrc
    kv = dict(fields or {})
    kv.update({k: v for k, v in bth_fields.items()})
    kv["padcount"] = pad
    kv["payload"] = payload.hex()
    kv["icrc"] = icrc
    kv["ip_id"] = ip_id
    kv["df"] = int(df)
    kv["ttl"] = ttl
    kv["tos"] = tos
    kv["sport"] = sport
    if aeth is not None:
        kv["syndrome"] = aeth[0]
        kv["msn"] = aeth[1]
    parts = []
    for k, v in kv.items():
        parts.append(f"{k}={v}" if k == "payload" else f"{k}={v:x}")
    return f"{name}|{data.hex()}|{','.join(parts)}"


def reth(va, rkey, dlen):
    return struct.pack("!QII", va, rkey, dlen), {"va": va, "rkey": rkey, "dma_len": dlen}


def main():
    out = []
    out.append(frame("send_only", dict(opcode=0x04, dqpn=0x11, psn=0x100, ackreq=1),
                     payload=b"hello, rxe!"))
    out.append(frame("send_only_imm", dict(opcode=0x05, dqpn=0x12, psn=0xFFFFFF, ackreq=1,
                                           solicited=1),
                     ext=struct.pack("!I", 0xDEADBEEF), payload=bytes(range(64)),
                     fields={"imm": 0xDEADBEEF}))
    ext, f = reth(0x00007F00_12345678, 0x1234ABCD, 4096)
    out.append(frame("write_first", dict(opcode=0x06, dqpn=0x13, psn=0x2A), ext=ext,
                     payload=bytes((i * 7) & 0xFF for i in range(1024)), fields=f))
    ext, f = reth(0x10000, 0x42, 12345)
    out.append(frame("read_request", dict(opcode=0x0C, dqpn=0x14, psn=0x777, ackreq=1),
                     ext=ext, fields=f))
    out.append(frame("read_response_only", dict(opcode=0x10, dqpn=0x15, psn=0x777),
                     aeth=(0x1F, 0x3), payload=b"read-data-13b"))
    out.append(frame("ack", dict(opcode=0x11, dqpn=0x16, psn=0x123456), aeth=(0x1F, 0x10)))
    out.append(frame("nak_seq", dict(opcode=0x11, dqpn=0x16, psn=0x5), aeth=(0x60, 0x2)))
    out.append(frame("rnr_nak", dict(opcode=0x11, dqpn=0x16, psn=0x6), aeth=(0x2E, 0x2)))
    atom = struct.pack("!QIQQ", 0x2000, 0x99, 0x1111222233334444, 0x5555666677778888)
    out.append(frame("cmp_swap", dict(opcode=0x13, dqpn=0x17, psn=0x42, ackreq=1), ext=atom,
                     fields={"va": 0x2000, "rkey": 0x99, "swap_add": 0x1111222233334444,
                             "compare": 0x5555666677778888}))
    out.append(frame("atomic_ack", dict(opcode=0x12, dqpn=0x17, psn=0x42), aeth=(0x1F, 0x7),
                     ext=struct.pack("!Q", 0xCAFEF00D12345678),
                     fields={"orig": 0xCAFEF00D12345678}))
    deth = struct.pack("!IBBH", 0x80010000, 0, 0, 1)  # Q_Key, reserved, src QP 1
    out.append(frame("ud_send_only", dict(opcode=0x64, dqpn=1, psn=0x10), ext=deth,
                     payload=bytes(256), sport=0xC000,
                     fields={"qkey": 0x80010000, "src_qpn": 1}))
    # IP ID and DF are covered by the ICRC: a frame that is not what rxe sends.
    out.append(frame("send_only_id_nodf", dict(opcode=0x04, dqpn=0x11, psn=0x101),
                     payload=b"abc", ip_id=0x1234, df=False, ttl=3, tos=0xB8))
    # What Linux rdma_rxe sends: DF with a non-zero IP ID (incrementing per packet),
    # covered by the ICRC; a UDP-socket receiver solves for it.
    out.append(frame("rxe_send_only_id", dict(opcode=0x04, dqpn=0x11, psn=0x102, ackreq=1),
                     payload=b"from kernel rxe", ip_id=0x5A3C, sport=0xC0DE))
    out.append(frame("rxe_write_middle_id", dict(opcode=0x07, dqpn=0x13, psn=0x2B),
                     payload=bytes((i * 11) & 0xFF for i in range(1024)), ip_id=0xFFFF,
                     sport=0xC0DE))
    out.append(frame("rxe_ack_id", dict(opcode=0x11, dqpn=0x16, psn=0x123457), aeth=(0x1F, 0x11),
                     ip_id=0x0001, sport=0xC0DE))
    # CNP captured on a ConnectX-4 Lx, from scapy's test/contrib/roce.uts.
    cx4 = Ether(import_hexcap("""0x0000:  e41d 2dab 2bc2 7cfe 9064 3b32 0800 45c2
0x0010:  003c 718c 4000 4011 9161 0a00 1101 0a00
0x0020:  1201 0000 12b7 0028 0000 8100 ffff 4000
0x0030:  0118 0000 0000 0000 0000 0000 0000 0000
0x0040:  0000 0000 0000 82fd 002a
"""))
    ip = cx4[IP]
    # scapy recomputes the ICRC when it is deleted, as its test does.
    rebuilt = cx4.copy()
    del rebuilt[BTH].icrc
    rebuilt = Ether(raw(rebuilt))
    assert rebuilt[BTH].icrc == 0x82FD002A, hex(rebuilt[BTH].icrc)
    b = cx4[BTH]
    kv = {"opcode": b.opcode, "dqpn": b.dqpn, "psn": b.psn, "ackreq": b.ackreq,
          "padcount": b.padcount, "becn": b.becn, "icrc": rebuilt[BTH].icrc,
          "ip_id": ip.id, "df": 1, "ttl": ip.ttl, "tos": ip.tos, "sport": cx4[UDP].sport}
    out.append("cnp_connectx4lx|" + raw(ip).hex() + "|" + ",".join(
        f"{k}={v:x}" for k, v in kv.items()) + ",payload=" + bytes(16).hex())
    sys.stdout.write("# generated by gen_vectors.py with scapy "
                     + __import__("scapy").__version__ + "\n")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
