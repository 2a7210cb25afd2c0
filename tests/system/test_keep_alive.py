"""``prefero serve`` keeps an idle keep-alive connection open longer than clients and proxies
do (``--keep-alive``, 75 s by default), so the client side closes first. With uvicorn's 5 s,
equal to httpx's own expiry, a request sent just as the server closed the connection got no
answer (seen once in ``test_db_faults.py``: ``RemoteProtocolError``)."""

from __future__ import annotations

import socket
import time

import pytest

from app.cli import KEEP_ALIVE_S
from tests.conftest import create_database, migrate
from tests.system._harness import Server

pytestmark = pytest.mark.slow

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _answer(sock: socket.socket) -> bytes:
    """One HTTP answer's bytes (headers and the small body), or b"" when the server closed."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


@pytest.fixture
def database(tmp_path):
    url, drop = create_database("sqlite", tmp_path)
    migrate(url)
    yield url
    drop()


@pytest.mark.parametrize(
    ("args", "idle_s", "kept"), [((), 6.0, True), (("--keep-alive", "1"), 2.5, False)]
)
def test_an_idle_connection_stays_open_for_the_keep_alive_timeout(
    database, tmp_path, args, idle_s, kept
):
    assert KEEP_ALIVE_S > 60  # above nginx's and AWS ALB's 60 s upstream idle timeout
    server = Server(database_url=database, data_dir=tmp_path / "data", workers=1, args=args)
    try:
        server.start()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(REQUEST)
            assert _answer(sock).startswith(b"HTTP/1.1 200")
            time.sleep(idle_s)  # longer than uvicorn's default of 5 s
            if kept:
                sock.sendall(REQUEST)
                assert _answer(sock).startswith(b"HTTP/1.1 200")
            else:
                assert sock.recv(1) == b""  # the server closed it
    finally:
        server.stop()
