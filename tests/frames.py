"""
Frames as they travel, for tests that write to or read from a transport.
"""

from struct import pack
from typing import Any, List, Optional

from p2pfiles.protocol import LocalIdentity
from p2pfiles.wire import PROTOCOL_VERSION, Message, decode, encode


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


def hello(identity: LocalIdentity, nonce: str, proof: Optional[str] = None, **overrides: Any) -> Message:
    """
    The C{hello} that C{identity} sends, with any field overridden.
    """
    fields = dict(
        version=PROTOCOL_VERSION,
        role=identity.role,
        node=identity.node,
        nonce=nonce,
        address=identity.address,
        proof=proof,
        purpose=identity.purpose,
    )
    fields.update(overrides)
    return Message("hello", **fields)
