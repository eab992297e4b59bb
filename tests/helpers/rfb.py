"""A minimal RFB (VNC) viewer for tests: handshake with no security, one full framebuffer
update in Raw encoding at 32 bits per pixel, and the pixels counted by colour (RFC 6143)."""
import struct


def recv_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


class RfbViewer:
    """Over a connected stream ``io`` with recv/sendall (a socket, or a WebSocket adapter)."""

    def __init__(self, io):
        self.io = io
        self.width = self.height = None
        self.name = None

    def handshake(self):
        version = recv_exactly(self.io, 12)
        assert version.startswith(b"RFB 003."), version
        self.io.sendall(b"RFB 003.008\n")
        count = recv_exactly(self.io, 1)[0]
        assert count, recv_exactly(self.io, struct.unpack(">I", recv_exactly(self.io, 4))[0])
        types = recv_exactly(self.io, count)
        assert 1 in types, f"no 'None' security type offered: {list(types)}"
        self.io.sendall(b"\x01")
        result = struct.unpack(">I", recv_exactly(self.io, 4))[0]
        assert result == 0, "security handshake failed"
        self.io.sendall(b"\x01")                                      # ClientInit: shared
        self.width, self.height = struct.unpack(">HH", recv_exactly(self.io, 4))
        recv_exactly(self.io, 16)                                     # server pixel format
        name_length = struct.unpack(">I", recv_exactly(self.io, 4))[0]
        self.name = recv_exactly(self.io, name_length).decode(errors="replace")
        # 32 bpp, depth 24, little endian, true colour, red at bit 16, green 8, blue 0
        self.io.sendall(struct.pack(">BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
        self.io.sendall(struct.pack(">BxHi", 2, 1, 0))               # SetEncodings: Raw only
        return self

    def frame(self):
        """One full, non-incremental update: {(r, g, b): pixel count}."""
        self.io.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, self.width, self.height))
        counts = {}
        while True:
            kind = recv_exactly(self.io, 1)[0]
            if kind == 0:
                break
            if kind == 1:                                             # SetColourMapEntries
                _, _, n = struct.unpack(">xHH", recv_exactly(self.io, 5))
                recv_exactly(self.io, 6 * n)
            elif kind == 2:                                           # Bell
                continue
            elif kind == 3:                                           # ServerCutText
                n = struct.unpack(">xxxI", recv_exactly(self.io, 7))[0]
                recv_exactly(self.io, n)
            else:
                raise AssertionError(f"unexpected server message {kind}")
        rects = struct.unpack(">xH", recv_exactly(self.io, 3))[0]
        for _ in range(rects):
            x, y, w, h, encoding = struct.unpack(">HHHHi", recv_exactly(self.io, 12))
            assert encoding == 0, f"encoding {encoding} though only Raw was asked for"
            pixels = recv_exactly(self.io, w * h * 4)
            for i in range(0, len(pixels), 4):
                b, g, r = pixels[i], pixels[i + 1], pixels[i + 2]
                counts[(r, g, b)] = counts.get((r, g, b), 0) + 1
        return counts
