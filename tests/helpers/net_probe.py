#!/usr/bin/env python3
"""What a VM can reach, seen from both ends (the VM network filter tests, docs/hkd.md#firewall).

Run inside a test namespace (never on the machine's own network):

  net_probe.py node BRIDGE PORT,PORT...   on the node's side: listens on 0.0.0.0:PORT (TCP)
                                          and taps BRIDGE for frames carrying a probe marker;
                                          prints READY, and at EOF on stdin one JSON line
                                          {"accepted": [port, ...], "seen": [marker, ...]}
  net_probe.py vm SPEC                    inside a VM: SPEC is JSON {"tcp": [[host, port], ...],
                                          "frames": [{"name", "kind", "src_mac", "src_ip",
                                          "dst_ip"}, ...]}; tries every TCP connection at once
                                          (1.5 s each), sends every frame raw on eth0, prints
                                          {"reached": ["host:port", ...]}

A frame carries the marker ``QVDPROBE-<name>``; the tap on the node's bridge device sees
only what the bridge let through to the node (its prerouting and input filters come
before), so a missing marker means the bridge dropped the frame.
"""
import json
import select
import socket
import struct
import sys
import threading
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6
MARK = b"QVDPROBE-"


def _mac(text):
    return bytes(int(x, 16) for x in text.split(":"))


def _checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(kind, src_mac, src_ip, dst_ip, marker):
    """An Ethernet frame to all: ipv4 (UDP to port 9), arp (a reply claiming src_ip), or ipv6 (link-local)."""
    if kind == "ipv4":
        udp = struct.pack("!HHHH", 40000, 9, 8 + len(marker), 0) + marker
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                           socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
        head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
        return BROADCAST + _mac(src_mac) + b"\x08\x00" + head + udp
    if kind == "arp":
        body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, _mac(src_mac), socket.inet_aton(src_ip),
                           BROADCAST, socket.inet_aton(dst_ip))
        return BROADCAST + _mac(src_mac) + b"\x08\x06" + body + marker      # marker in the trailer
    if kind == "ipv6":                          # link-local to all nodes, "no next header", the marker as payload
        head = struct.pack("!IHBB16s16s", 6 << 28, len(marker), 59, 255,
                           socket.inet_pton(socket.AF_INET6, "fe80::1"), socket.inet_pton(socket.AF_INET6, "ff02::1"))
        return b"\x33\x33\x00\x00\x00\x01" + _mac(src_mac) + b"\x86\xdd" + head + marker
    raise ValueError(kind)


def node_side(bridge, ports):
    accepted, seen = [], set()
    listeners = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(16)
        listeners.append(sock)
    tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    tap.bind((bridge, 0))
    done = threading.Event()

    def wait_eof():
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_eof, daemon=True).start()
    print("READY", flush=True)
    deadline = time.monotonic() + 60            # bounded even if the test forgets us
    while not done.is_set() and time.monotonic() < deadline:
        ready, _, _ = select.select(listeners + [tap], [], [], 0.1)
        for sock in ready:
            if sock is tap:
                data, address = tap.recvfrom(65535)
                if address[2] != PACKET_OUTGOING and MARK in data:
                    start = data.index(MARK) + len(MARK)
                    seen.add(data[start:].split(b"\0")[0].decode(errors="replace"))
            else:
                conn, _ = sock.accept()
                accepted.append(sock.getsockname()[1])
                conn.close()
    print(json.dumps({"accepted": accepted, "seen": sorted(seen)}), flush=True)


def vm_side(spec):
    reached = []

    def connect(host, port):
        try:
            socket.create_connection((host, port), timeout=1.5).close()
            reached.append(f"{host}:{port}")
        except OSError:
            pass

    threads = [threading.Thread(target=connect, args=tuple(t)) for t in spec.get("tcp", [])]
    for thread in threads:
        thread.start()
    if spec.get("frames"):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        raw.bind(("eth0", 0))
        for item in spec["frames"]:
            marker = MARK + item["name"].encode() + b"\0" * 8
            for _ in range(3):                  # the tap must not miss a frame that passed
                raw.send(frame(item["kind"], item["src_mac"], item["src_ip"], item["dst_ip"], marker))
        raw.close()
    for thread in threads:
        thread.join()
    print(json.dumps({"reached": sorted(reached)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "node":
        node_side(sys.argv[2], [int(p) for p in sys.argv[3].split(",") if p])
    else:
        vm_side(json.loads(sys.argv[2]))
