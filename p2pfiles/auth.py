"""
The cluster secret and the mutual challenge-response that proves it.

Both ends of a connection send a fresh random nonce in their C{hello}.  The
listening side proves first, the connecting side second; each proof is an
HMAC-SHA256 over a label naming the prover's side and both nonces, so a proof
can neither be replayed on another connection nor reflected back to its
sender.  Without a secret the key is empty: the exchange still runs (one code
path) but proves nothing, which is why a node refuses to listen on a
non-loopback address without one.
"""

import hmac
import os
from hashlib import sha256

from twisted.python.filepath import FilePath

NONCE_BYTES = 32

# The sides of the handshake, bound into each proof.
LISTENER = b"p2pfiles-listener-v1"
CONNECTOR = b"p2pfiles-connector-v1"


class SecretError(Exception):
    """
    The secret file cannot be used; the string form says why, in one line.
    """


def makeNonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def proof(secret: bytes, side: bytes, connectorNonce: str, listenerNonce: str) -> str:
    """
    The proof that the C{side} end of a connection knows C{secret}.
    """
    message = b"\0".join([side, connectorNonce.encode("ascii"), listenerNonce.encode("ascii")])
    return hmac.new(secret, message, sha256).hexdigest()


def verify(secret: bytes, side: bytes, connectorNonce: str, listenerNonce: str, claimed: str) -> bool:
    """
    Check a proof in constant time.
    """
    expected = proof(secret, side, connectorNonce, listenerNonce)
    return hmac.compare_digest(expected.encode("ascii"), claimed.encode("utf-8", "replace"))


def validNonce(nonce: str) -> bool:
    return len(nonce) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in nonce)


def readSecret(path: str) -> bytes:
    """
    Read the cluster secret from C{path}: its content with surrounding
    whitespace removed.  An empty or unreadable file is a L{SecretError}.
    """
    try:
        data = FilePath(path).getContent().strip()
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror or e}") from None
    if not data:
        raise SecretError(f"secret file {path} is empty")
    return data
