"""uvicorn's HTTP/1.1 protocol with the timeout it lacks for connections that send nothing.

uvicorn closes a keep-alive connection `timeout_keep_alive` seconds after its last response, but
a connection that never sends a complete request is held forever (100 of them were 100 open
sockets, and with a thread per connection they were 100 threads). Here the same timer also runs
from the moment a connection opens until its request's headers are in, on a deadline that a
trickle of bytes does not move.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


class IdleClosingH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_deadline = self.loop.time() + self.timeout_keep_alive
        self._arm()

    def on_response_complete(self) -> None:
        self._headers_deadline = self.loop.time() + self.timeout_keep_alive
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self._arm()  # still waiting for a whole request: the same deadline stands

    def _arm(self) -> None:
        self._unset_keepalive_if_required()
        delay = max(0.0, self._headers_deadline - self.loop.time())
        self.timeout_keep_alive_task = self.loop.call_later(delay, self.timeout_keep_alive_handler)
