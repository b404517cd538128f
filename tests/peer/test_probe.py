"""The host's side of an address probe: a fixed, domain-separated message, signed only
when well-formed, so a stranger cannot use a host as a signing oracle."""

from __future__ import annotations

import socket
import threading

import pytest

from broker_api.challenges import PURPOSES, verify
from broker_api.challenges import message as key_message
from peer import probe, wire
from peer.channel import Refused, accept
from peer.errors import ProtocolError
from peer.identity import Identity
from peer.wire import Kind

CHALLENGE = "A" * 43


def _ask(identity: Identity, payload: bytes) -> tuple[Kind, dict] | Exception:
    """Send one PROBE frame to ``channel.accept`` (the daemon's front door) over a
    socketpair and return the answer, or what accept raised."""
    ours, theirs = socket.socketpair()
    raised: list[Exception] = []

    def door() -> None:
        try:
            accept(theirs, identity, lambda hello: "no sessions here")
        except Exception as exc:
            raised.append(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=door)
    thread.start()
    wire.write_frame(ours, Kind.PROBE, [payload])
    ours.settimeout(5)
    try:
        kind, body = wire.read_frame(ours, max_frame=4096)
        answer: tuple[Kind, dict] | Exception = (kind, wire.decode_json(body))
    except ProtocolError as exc:  # closed without an answer
        answer = exc
    thread.join(5)
    ours.close()
    assert raised, "accept must not return a channel for a probe"
    return answer if isinstance(answer, tuple) else raised[0]


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return Identity.create(tmp_path_factory.mktemp("host"))


def test_the_front_door_signs_a_probe_with_the_registered_key(identity):
    address = "peer.example.org:7000"
    kind, body = _ask(identity, wire.encode_json({"challenge": CHALLENGE, "address": address}))
    assert kind is Kind.PROBE_OK
    assert verify(identity.public_key, body["signature"], probe.message(CHALLENGE, address))
    assert not verify(
        identity.public_key, body["signature"], probe.message(CHALLENGE, "other.example.org:7000")
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"challenge": "short", "address": "h:1"},
        {"challenge": CHALLENGE, "address": "h:1\nlogin"},
        {"challenge": CHALLENGE + "\n", "address": "h:1"},
        {"challenge": CHALLENGE, "address": "h:1", "purpose": "login"},
        {"challenge": CHALLENGE},
        {"challenge": CHALLENGE, "address": 7},
        {"challenge": CHALLENGE, "address": "x" * 600 + ":1"},
    ],
    ids=[
        "short-challenge",
        "newline-address",
        "newline-challenge",
        "extra-field",
        "no-address",
        "not-string",
        "big",
    ],
)
def test_malformed_probes_are_not_signed(identity, fields):
    answer = _ask(identity, wire.encode_json(fields))
    assert isinstance(answer, ProtocolError), answer


def test_an_answered_probe_ends_the_connection_as_a_refusal(identity):
    """The daemon treats an answered probe like a refused hello: it closes the socket and
    never opens a session for it."""
    ours, theirs = socket.socketpair()
    wire.write_frame(ours, Kind.PROBE, [wire.encode_json({"challenge": CHALLENGE, "address": "h:1"})])
    with pytest.raises(Refused, match="address probe"):
        accept(theirs, identity, lambda hello: None)
    ours.close()
    theirs.close()


def test_probe_signatures_can_never_be_key_challenge_signatures():
    """Domain separation: no probe message equals a message the broker accepts for a
    log-in, a sign-up or a key change, whatever the challenge and subject."""
    signed = probe.message(CHALLENGE, "h:1")
    assert signed.startswith(probe.TAG.encode() + b"\n")
    for purpose in PURPOSES:
        assert not signed.startswith(key_message(purpose, "", "")[: len("compute-broker/v1\n")])
    assert not probe.TAG.startswith("compute-broker/v1")


def test_the_broker_side_reads_a_bounded_answer():
    ours, theirs = socket.socketpair()
    ours.settimeout(5)

    def host() -> None:
        wire.read_frame(theirs, max_frame=4096)
        wire.write_frame(theirs, Kind.PROBE_OK, [b"x" * (probe.MAX_PAYLOAD + 1)])

    thread = threading.Thread(target=host)
    thread.start()
    with pytest.raises(ProtocolError, match="limit"):
        probe.ask(ours, CHALLENGE, "h:1")
    thread.join(5)
    ours.close()
    theirs.close()
