"""A loopback TCP proxy that reads the client's HTTP/2 frames and records each gRPC message's
compressed flag (the first byte of the 5-byte gRPC message prefix in a stream's first DATA frame)."""

from __future__ import annotations

import socket
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class SniffProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.compressed_flags: list[int] = []
        self.client_bytes = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, sniff: bool) -> None:
        buf = b""
        seen_streams: set[int] = set()
        preface_done = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if not sniff:
                    continue
                self.client_bytes += len(data)
                buf += data
                if not preface_done:
                    if len(buf) < len(PREFACE):
                        continue
                    buf = buf[len(PREFACE):]
                    preface_done = True
                while len(buf) >= 9:
                    length = int.from_bytes(buf[0:3], "big")
                    if len(buf) < 9 + length:
                        break
                    ftype, stream = buf[3], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    payload = buf[9:9 + length]
                    if ftype == 0 and stream not in seen_streams and payload:
                        pad = payload[0] if buf[4] & 0x8 else 0
                        body = payload[1:len(payload) - pad] if buf[4] & 0x8 else payload
                        if body:
                            seen_streams.add(stream)
                            self.compressed_flags.append(body[0])
                    buf = buf[9 + length:]
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()
