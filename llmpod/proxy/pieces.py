"""``SizedBody``: an answer of known length sent in pieces of ``PIECE_BYTES``, each made only when the client has
taken the one before.

A large answer handed to the server whole is copied into the connection's write buffer whole: a client that stops
reading then holds all of it in memory until it is cut (``SendDeadline``), and thirty of them held the proxy's
memory at thirty copies (issue 16). Sent in pieces, uvicorn waits for its transport to drain before it takes the next
one, so a stalled reader holds one piece and the connection's buffer, whatever the answer's size. The length is known
up front, so the answer carries a ``Content-Length`` as a whole ``Response`` would (HTTP/1.0 clients included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PIECE_BYTES = 64 * 1024  # asyncio's default high-water mark for a transport's write buffer


class SizedBody(Response):
    """Send ``status_code``, ``headers`` and a ``Content-Length`` of ``length``, then each of ``pieces``.

    ``close`` runs when the answer is done, abandoned or never sent (a ``Response`` subclass so routes may return
    it; none of Response's body handling is used).
    """

    def __init__(
        self,
        pieces: Iterable[bytes],
        length: int,
        *,
        media_type: str,
        headers: Mapping[str, str] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.pieces = pieces
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self.raw_headers.append((b"content-length", str(length).encode()))
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for piece in self.pieces:  # the next piece is made only once the server took this one
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.close()

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()

    def __del__(self) -> None:
        self.close()  # never sent (an error before the server called it): its file is still let go


def sized(body: bytes, *, media_type: str, headers: Mapping[str, str] | None = None) -> Response:
    """``body`` as one message if it is small (the usual answer: fastest), else in pieces."""
    if len(body) <= PIECE_BYTES:
        return Response(body, media_type=media_type, headers=headers)
    return SizedBody(slices(body), len(body), media_type=media_type, headers=headers)


def slices(data: bytes, size: int = PIECE_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes: copied one at a time, as each is sent."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])
