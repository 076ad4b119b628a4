"""A loopback TCP forwarder that can refuse connections for a while: a BigQuery endpoint that is down, then back."""

from __future__ import annotations

import socket
import threading
import time


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to target; while `down` is set, accepted connections are closed at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.down = threading.Event()
        self.refused = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            if self.down.is_set():
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def up_after(self, seconds: float) -> None:
        def _up() -> None:
            time.sleep(seconds)
            self.down.clear()

        threading.Thread(target=_up, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._server.close()
