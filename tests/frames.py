"""
Frames as they travel, for tests that write to or read from a transport.
"""

from struct import pack
from typing import Any, List

from p2pfiles import auth
from p2pfiles.protocol import LocalIdentity
from p2pfiles.wire import PROTOCOL_VERSION, Message, decode, encode
from tests.channels import PLAIN_EXPORTER


def frame(message: Message) -> bytes:
    """
    C{message} as it travels: 4-byte length, type byte, JSON.
    """
    return rawFrame(encode(message))


def rawFrame(payload: bytes) -> bytes:
    return pack("!I", len(payload)) + payload


def parseFrames(data: bytes) -> List[Message]:
    """
    Decode every complete frame in C{data}.
    """
    messages = []
    while len(data) >= 4:
        length = int.from_bytes(data[:4], "big")
        if len(data) < 4 + length:
            break
        messages.append(decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return messages


def hello(identity: LocalIdentity, nonce: str, **overrides: Any) -> Message:
    """
    The C{hello} that C{identity} sends, with any field overridden.
    """
    fields = dict(
        version=PROTOCOL_VERSION,
        role=identity.role,
        node=identity.node,
        nonce=nonce,
        address=identity.address,
        purpose=identity.purpose,
        fingerprint=identity.fingerprint,
    )
    fields.update(overrides)
    return Message("hello", **fields)


def proofFor(
    secret: bytes, side: bytes, connectorHello: Message, listenerHello: Message, exporter: bytes = PLAIN_EXPORTER
) -> str:
    """
    The proof the C{side} end makes after these two hellos, on a channel
    exporting C{exporter} (a plain test channel's by default).
    """
    return auth.proof(secret, side, exporter, encode(connectorHello), encode(listenerHello))
