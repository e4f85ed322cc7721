"""What an HTTP client can hold of the server, bounded: ASGI middleware and uvicorn options that
``chatrlhf serve`` (serve.py) runs with.

- ``BearerAuth``: with an API key, 401 for a request without ``Authorization: Bearer KEY``,
  answered from its head alone.
- ``BodyLimit``: 413 for a body over the limit, declared or streamed; 408 for one not whole in time.
- ``guarded_protocol``: uvicorn's HTTP protocol with a deadline on the request head (408).
- ``validation_error`` / ``unparsable_body``: 422 with one readable line per problem for
  malformed JSON and wrong types.
- ``server_options``: the uvicorn options (limit on concurrency, keep-alive, the head deadline).

fastapi and uvicorn are imported where used: ``chatrlhf --help`` builds serve's parser without them.
"""

import asyncio
import hmac
import time


class BearerAuth:
    """ASGI middleware: every path but ``open_paths`` needs ``Authorization: Bearer <api_key>``
    (compared in constant time); else 401, before the body is read. The connection is closed
    after a 401, as the body the client may still be sending is not read."""

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        detail = ("missing or wrong API key: send the header Authorization: Bearer KEY "
                  "(the server's --api-key / $CHATRLHF_API_KEY)")
        await JSONResponse({"detail": detail}, status_code=401, headers={
            "www-authenticate": "Bearer", "connection": "close"})(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, declared or streamed; 408 for
    one not whole within ``read_timeout`` seconds of its head (a client that stalls mid-body
    would otherwise hold its connection and its task forever)."""

    def __init__(self, app, max_bytes: int, read_timeout: float):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send, int(declared))
        # Read the body here (the routes read it whole anyway) so a chunked upload is
        # counted too, then hand it on unchanged. One deadline for the whole body, not one
        # per chunk: a client dripping a byte a second must not stretch it.
        deadline = time.monotonic() + self.read_timeout
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._timed_out(scope, receive, send, size, declared)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, receive, send, size)
            more = message.get("more_body", False)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, size: int) -> None:
        from fastapi.responses import JSONResponse

        detail = (f"request body of {size}+ bytes is larger than the server's limit of "
                  f"{self.max_bytes} bytes (--max-body-bytes)")
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)

    async def _timed_out(self, scope, receive, send, size: int, declared: bytes | None) -> None:
        from fastapi.responses import JSONResponse

        expected = f"of {int(declared)} " if declared is not None and declared.isdigit() else ""
        detail = (f"request body not received within {self.read_timeout:g} s (--read-timeout): "
                  f"{size} bytes {expected}arrived")
        # Connection: close: the rest of the body may still come; it must not be read as
        # the next request.
        await JSONResponse({"detail": detail}, status_code=408,
                           headers={"connection": "close"})(scope, receive, send)


def guarded_protocol(read_timeout: float) -> type:
    """uvicorn's HTTP protocol (h11, or httptools when installed) with a deadline on the request
    head: a connection that has not sent a whole request line and headers ``read_timeout``
    seconds after it opened (or after its previous answer) is closed, with a 408 when part of a
    head arrived. uvicorn has no such deadline (its keep-alive timer stops at the first byte),
    so a client sending headers one byte at a time, or never, would hold its connection, and
    a slot of ``--limit-concurrency``, forever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadDeadline(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            self.head_started = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            # Armed first: a pipelined request handled inside super() replaces self.cycle.
            self._arm_head_deadline()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self.head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if getattr(self, "head_timer", None):
                self.head_timer.cancel()
            # A new head has arrived once the protocol has replaced its request cycle (both
            # uvicorn protocols make a new self.cycle when a head is complete).
            self.head_started = False
            self.head_timer = self.loop.call_later(read_timeout, self._head_timed_out, self.cycle)

        def _head_timed_out(self, cycle) -> None:
            if (self.cycle is not cycle or self.transport.is_closing()
                    or self.transport.get_protocol() is not self):  # handed to a WebSocket
                return
            if self.head_started:
                detail = (f'{{"detail": "request head not received within {read_timeout:g} s '
                          f'(--read-timeout)"}}').encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json"
                                     b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                     % (len(detail), detail))
            self.transport.close()

    return HeadDeadline


async def validation_error(request, error):
    """One readable line per problem ("body.items.0.reply: Field required"), then the details."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    lines = []
    for e in error.errors():
        where = ".".join(str(part) for part in e.get("loc", ()))
        reason = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            reason = f"malformed JSON ({(e.get('ctx') or {}).get('error', 'decode error')})"
            where = f"body at character {e['loc'][-1]}" if len(e.get("loc", ())) > 1 else "body"
        elif tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), (str, bytes)):
            reason = "not read as JSON; send the header Content-Type: application/json"
        elif tuple(e.get("loc", ())) == ("body",):
            reason = ("empty; " if e.get("type") == "missing" else "") + "expected a JSON object"
        lines.append(f"{where}: {reason}")
    # The inputs are left out: echoing a large body back helps no one.
    errors = [{k: v for k, v in e.items() if k != "input"} for e in error.errors()]
    return JSONResponse({"detail": "invalid request: " + "; ".join(lines),
                         "errors": jsonable_encoder(errors)}, status_code=422)


async def unparsable_body(request, error):
    """FastAPI answers a body that json.loads rejects with anything but a JSONDecodeError (bytes
    that are not UTF-8, nesting deeper than Python's recursion limit, an integer of thousands
    of digits) with a bare 400 "There was an error parsing the body": say why, as 422 like
    other malformed JSON."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import JSONResponse

    cause = error.__cause__
    if error.status_code != 400 or not isinstance(cause, (ValueError, RecursionError)):
        return await http_exception_handler(request, error)
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8: byte {cause.start} is {cause.object[cause.start:cause.start + 1]!r}"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = str(cause).split(";")[0]
    return JSONResponse({"detail": f"invalid request: body: malformed JSON ({reason})"}, status_code=422)


def server_options(*, read_timeout: float = 30.0, limit_concurrency: int | None = 512,
                   timeout_keep_alive: float = 5.0) -> dict:
    """The uvicorn options (``uvicorn.run`` / ``uvicorn.Config`` keywords) that bound what a
    client can hold: ``chatrlhf serve`` runs with them, the tests too.

    Args:
        read_timeout: seconds for a request head to arrive, from the connection's opening or its
            previous answer (``guarded_protocol``); the body's deadline is ``create_app``'s.
        limit_concurrency: open connections plus requests in progress beyond which a request
            is answered 503 at once, so a flood queues no unbounded work (None: no limit).
        timeout_keep_alive: seconds an idle keep-alive connection stays open after an answer.
    """
    if read_timeout <= 0 or timeout_keep_alive < 0 or (
            limit_concurrency is not None and limit_concurrency < 1):
        raise ValueError(f"read_timeout must be > 0 (got {read_timeout}), timeout_keep_alive >= 0 (got "
                         f"{timeout_keep_alive}), limit_concurrency >= 1 or None (got {limit_concurrency})")
    return {"http": guarded_protocol(read_timeout), "limit_concurrency": limit_concurrency,
            "timeout_keep_alive": timeout_keep_alive}
