"""``H11Transport``: HTTP/1.1 on h11 over pooled trio streams, behind ``httpx.AsyncClient``.

Against the real mock provider, and a small raw loopback server (a hand-written HTTP/1.1
responder) for what the mock never does: cut bodies, ``connection: close``, closing idle
connections, holding responses back. Connections are counted at the server.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from relayrace.actors import H11Transport
from relayrace.testing import MockProvider, serve_mock_provider
from tests import test_over_http as over_http

# --- a raw server ------------------------------------------------------------------------------

#: What the server does with one request: (server, stream, path, number of the request on this
#: connection, from 1) -> keep the connection open for another request?
Behaviour = Callable[["RawServer", trio.SocketStream, str, int], Awaitable[bool]]


@attrs.define
class RawServer:
    url: str = ""
    accepted: int = 0
    open: int = 0
    arrivals: list[str] = attrs.Factory(list)
    bodies: list[bytes] = attrs.Factory(list)
    gates: dict[str, trio.Event] = attrs.Factory(dict)

    def gate(self, path: str) -> trio.Event:
        return self.gates.setdefault(path, trio.Event())


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> tuple[str, bytes] | None:
    """The path and the body of the next request, or None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[:end]
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        assert name.strip().lower() != "expect"
    while len(buffer) < length:
        data = await stream.receive_some(65536)
        assert data, "the client closed in the middle of its request"
        buffer += data
    body = bytes(buffer[:length])
    del buffer[:length]
    return head[0].split(" ")[1], body


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Behaviour], Awaitable[RawServer]]]:
    async with trio.open_nursery() as nursery:

        async def start(behaviour: Behaviour) -> RawServer:
            server = RawServer()

            async def handle(stream: trio.SocketStream) -> None:
                server.accepted += 1
                server.open += 1
                buffer = bytearray()
                try:
                    n = 0
                    while (got := await read_request(stream, buffer)) is not None:
                        n += 1
                        path, body = got
                        server.arrivals.append(path)
                        server.bodies.append(body)
                        if not await behaviour(server, stream, path, n):
                            break
                except trio.BrokenResourceError:
                    pass
                finally:
                    server.open -= 1
                    await trio.aclose_forcefully(stream)

            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
            )
            server.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            return server

        yield start
        nursery.cancel_scope.cancel()


def reply(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in (f"content-length: {len(body)}", *extra))
    return f"HTTP/1.1 200 OK\r\n{head}\r\n".encode() + body


async def answer_ok(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
    await stream.send_all(reply(f"{path} #{n}".encode()))
    return True


def client(transport: H11Transport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0))


# --- against the mock provider -----------------------------------------------------------------


@pytest.fixture
async def provider() -> AsyncIterator[MockProvider]:
    async with serve_mock_provider() as served:
        yield served
        await wait_all_tasks_blocked()
        assert served.errors == []


def chat(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def test_one_keep_alive_connection_serves_requests_one_after_another(
    provider: MockProvider,
) -> None:
    async with client(H11Transport(max_connections=4)) as http:
        url = f"{provider.base_url}/v1/chat/completions"
        for _ in range(3):
            response = await http.post(url, json=chat("ok", False))
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"]
        for _ in range(3):
            async with http.stream("POST", url, json=chat("ok,chunks=20", True)) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert body.count(b"data: ") == 23  # the role, 20 deltas, the finish, [DONE]
            assert body.endswith(b"data: [DONE]\n\n")
        assert provider.accepted == 1
        assert provider.open_connections == 1
    await wait_all_tasks_blocked()
    assert provider.open_connections == 0


async def test_a_body_closed_before_its_end_closes_its_connection(provider: MockProvider) -> None:
    async with client(H11Transport(max_connections=4)) as http:
        url = f"{provider.base_url}/v1/chat/completions"
        async with http.stream("POST", url, json=chat("ok,chunks=20,delay=0.01", True)) as response:
            assert response.status_code == 200  # and the body is left unread
        await wait_all_tasks_blocked()
        assert provider.open_connections == 0
        assert (await http.post(url, json=chat("ok", False))).status_code == 200
        assert provider.accepted == 2


async def test_concurrent_requests_open_at_most_max_connections(provider: MockProvider) -> None:
    async with client(H11Transport(max_connections=3)) as http:
        url = f"{provider.base_url}/v1/chat/completions"
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await http.post(url, json=chat("ok", False))).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
        assert statuses == [200] * 10
        assert provider.accepted == 3


# --- against the raw server --------------------------------------------------------------------


async def test_waiters_are_served_first_come_first_served_within_the_bound(serve) -> None:
    async def held(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await server.gate(path).wait()
        return await answer_ok(server, stream, path, n)

    server = await serve(held)
    got: list[str] = []
    async with client(H11Transport(max_connections=2)) as http:

        async def one(path: str) -> None:
            got.append((await http.get(server.url + path)).text)

        async with trio.open_nursery() as nursery:
            for path in ("/a", "/b", "/c", "/d"):
                nursery.start_soon(one, path)
                await wait_all_tasks_blocked()
            assert (server.arrivals, server.accepted) == (["/a", "/b"], 2)
            server.gate("/b").set()
            await wait_all_tasks_blocked()
            assert server.arrivals == ["/a", "/b", "/c"]  # the first waiter, on b's connection
            server.gate("/a").set()
            await wait_all_tasks_blocked()
            assert server.arrivals == ["/a", "/b", "/c", "/d"]
            server.gate("/c").set()
            await wait_all_tasks_blocked()
            server.gate("/d").set()
        assert got == ["/b #1", "/a #1", "/c #2", "/d #2"]
        assert server.accepted == 2


async def test_the_latest_idle_connection_is_reused_first(serve) -> None:
    server = await serve(answer_ok)
    async with client(H11Transport(max_connections=4)) as http:
        async with trio.open_nursery() as nursery:
            for path in ("/a", "/b"):
                nursery.start_soon(http.get, server.url + path)
        # Both connections idle; one after another, requests reuse the same (latest) one.
        texts = [(await http.get(server.url + "/x")).text for _ in range(3)]
        assert [t.split(" #")[1] for t in texts] == ["2", "3", "4"]
        assert server.accepted == 2


async def test_a_cancelled_request_takes_no_connection_and_the_pooled_one_stays(serve) -> None:
    # A free slot is taken without a schedule point; a task already cancelled must still stop
    # before it takes (and, cancelled mid-send, closes) the pooled connection.
    server = await serve(answer_ok)
    async with client(H11Transport(max_connections=1)) as http:
        assert (await http.get(server.url + "/a")).text == "/a #1"
        with trio.CancelScope() as scope:
            scope.cancel()
            await http.get(server.url + "/b")
        assert scope.cancelled_caught
        assert (await http.get(server.url + "/c")).text == "/c #2"
        assert server.accepted == 1


async def test_connection_close_is_honoured(serve) -> None:
    async def closing(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await stream.send_all(reply(b"bye", "connection: close"))
        assert await stream.receive_some() == b""  # the client closes, not waiting for us to
        return False

    server = await serve(closing)
    async with client(H11Transport(max_connections=2)) as http:
        for _ in range(2):
            assert (await http.get(server.url + "/")).text == "bye"
            await wait_all_tasks_blocked()
            assert server.open == 0
        assert server.accepted == 2


async def test_an_idle_connection_closed_by_the_server_is_replaced_before_sending(serve) -> None:
    async def once(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await answer_ok(server, stream, path, n)
        return False  # then close, without having said so

    server = await serve(once)
    async with client(H11Transport(max_connections=1)) as http:
        assert (await http.post(server.url + "/1", content=b"x")).text == "/1 #1"
        await wait_all_tasks_blocked()
        assert server.open == 0
        assert (await http.post(server.url + "/2", content=b"x")).text == "/2 #1"
        assert server.arrivals == ["/1", "/2"]  # sent once, on the new connection
        assert server.accepted == 2


async def test_a_chunked_body_arrives_whole_and_the_connection_is_reused(serve) -> None:
    async def chunked(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(5):
            piece = f"part {i};".encode()
            await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            await trio.sleep(0.1)
        await stream.send_all(b"0\r\n\r\n")
        return True

    server = await serve(chunked)
    async with client(H11Transport()) as http:
        for _ in range(2):
            async with http.stream("GET", server.url + "/") as response:
                pieces = [chunk async for chunk in response.aiter_raw()]
            assert pieces == [f"part {i};".encode() for i in range(5)]
        assert server.accepted == 1


@pytest.mark.parametrize(
    "cut",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a part",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-len",
        b"",
    ],
    ids=["content-length", "chunked", "head", "nothing"],
)
async def test_a_cut_response_is_a_remote_protocol_error(serve, cut: bytes) -> None:
    async def cutting(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await stream.send_all(cut)
        return False

    server = await serve(cutting)
    async with client(H11Transport()) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url + "/")
        await wait_all_tasks_blocked()
        assert server.open == 0


async def test_a_malformed_response_is_a_remote_protocol_error(serve) -> None:
    async def garbage(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await stream.send_all(b"SMTP ready\r\n\r\n")
        return False

    server = await serve(garbage)
    async with client(H11Transport()) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url + "/")


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client(H11Transport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


class BlackHoleResolver(trio.abc.HostnameResolver):
    """A resolver that never answers: connecting hangs until the connect timeout."""

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        await trio.sleep_forever()

    async def getnameinfo(self, *args: Any, **kwargs: Any) -> Any:
        await trio.sleep_forever()


async def test_the_connect_timeout_of_the_request_is_honoured(autojump_clock) -> None:
    trio.socket.set_custom_hostname_resolver(BlackHoleResolver())
    async with httpx.AsyncClient(
        transport=H11Transport(), timeout=httpx.Timeout(None, connect=2.5)
    ) as http:
        start = trio.current_time()
        with pytest.raises(httpx.ConnectTimeout):
            await http.get("http://provider.invalid/")
        assert trio.current_time() - start == 2.5


async def test_cancelled_mid_body_closes_the_connection_and_leaves_no_task(
    serve, autojump_clock
) -> None:
    async def dribble(server: RawServer, stream: trio.SocketStream, path: str, n: int) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        assert await stream.receive_some() == b""  # the client closes, never sends again
        return False

    server = await serve(dribble)
    tasks_before = all_tasks()
    async with client(H11Transport(max_connections=1)) as http:
        read: list[bytes] = []
        with trio.move_on_after(1) as scope:
            async with http.stream("GET", server.url + "/") as response:
                async for chunk in response.aiter_raw():
                    read.append(chunk)
        assert scope.cancelled_caught
        assert read == [b"abc"]
        await wait_all_tasks_blocked()
        assert server.open == 0
        # The pool's one place is free again: a new request gets a new connection.
        with trio.move_on_after(1):
            async with http.stream("GET", server.url + "/") as response:
                async for chunk in response.aiter_raw():
                    read.append(chunk)
        assert server.accepted == 2
    await wait_all_tasks_blocked()
    assert all_tasks() == tasks_before


def all_tasks() -> set[trio.lowlevel.Task]:
    found: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is not None and task not in found:
            found.add(task)
            todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return found


async def test_a_request_body_is_sent_whole_with_its_length_and_no_expect(serve) -> None:
    server = await serve(answer_ok)  # read_request fails on an `expect` header
    async with client(H11Transport()) as http:
        for body in (b'{"a": 1}', b"", b"x" * 200_000):
            assert (await http.post(server.url + "/p", content=body)).status_code == 200
    assert server.bodies == [b'{"a": 1}', b"", b"x" * 200_000]
    assert server.accepted == 1


# --- TLS --------------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A throw-away self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_verifies_the_server_and_keeps_the_connection_alive(certificate) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    accepted = 0

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        nonlocal accepted
        accepted += 1
        buffer = bytearray()
        try:
            while (got := await read_request(stream, buffer)) is not None:
                await stream.send_all(reply(got[1]))
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, handle, 0, server_tls, host="127.0.0.1")
        )
        url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}/"
        trusting = ssl.create_default_context(cafile=str(cert))
        async with client(H11Transport(ssl_context=trusting)) as http:
            for body in (b"one", b"two"):
                assert (await http.post(url, content=body)).content == body
        assert accepted == 1
        async with client(H11Transport()) as http:  # the system's CAs: not this certificate
            with pytest.raises(httpx.ConnectError, match="certificate"):
                await http.get(url)
        nursery.cancel_scope.cancel()


# --- every test of tests/test_over_http.py, its clients on H11Transport ---------------------------


@pytest.fixture(autouse=True)
def _clients_on_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    """``test_over_http``'s provider clients (made by its ``client_for``) get an
    ``H11Transport`` of their size, so that its tests below run through this transport."""
    make = over_http.client_for

    def client_for(mock: MockProvider, fmt: str, **kwargs: Any) -> Any:
        transport = H11Transport(max_connections=kwargs.get("max_connections", 64))
        return make(mock, fmt, transport=transport, **kwargs)

    monkeypatch.setattr(over_http, "client_for", client_for)


mock = over_http.mock
for _name in dir(over_http):
    if _name.startswith("test_"):
        globals()[f"test_over_http_{_name[5:]}"] = getattr(over_http, _name)
