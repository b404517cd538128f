"""The broker client survives a keep-alive connection the server closed under it."""

from __future__ import annotations

import socket
import threading

import pytest

from peer.api import BrokerClient, BrokerUnreachable


def _server(answers: list[bytes | None]) -> tuple[str, threading.Thread]:
    """Serve one connection per entry: None hangs up without answering (what a request
    sent on a keep-alive connection the server is closing sees)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        with listener:
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    if answer is not None:
                        conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", thread


OK = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"


def test_a_request_aborted_by_the_server_is_sent_once_more():
    url, thread = _server([None, OK])
    BrokerClient(url, "token").heartbeat()
    thread.join(5)


def test_a_broker_that_keeps_hanging_up_is_reported_unreachable():
    url, thread = _server([None, None])
    with pytest.raises(BrokerUnreachable, match="cannot reach the broker"):
        BrokerClient(url, "token").heartbeat()
    thread.join(5)
