"""
The cluster secret and the mutual proof of it, bound to one TLS connection.

Every connection is TLS (L{p2pfiles.tls}).  Once its TLS handshake is done,
each end sends a C{hello} saying who it is (version, role, id, address,
purpose, certificate fingerprint and a fresh nonce).  The listening side
then proves first, the connecting side second; each proof is an
HMAC-SHA256, keyed by the secret, over:

  - a label naming the prover's side (so a proof cannot be reflected);
  - the connection's TLS exporter value (RFC 5705, label
    C{EXPORTER-p2pfiles-v2}): the same at both ends of this connection and
    different on every other, so a proof relayed to another connection is
    worthless whatever the relay does;
  - both complete hellos, in the codec's canonical encoding, connector's
    first: nothing either end claimed can be changed on the way.

Without a secret the key is empty: the exchange still runs (one code path)
but proves nothing, which is why a node refuses to listen on a non-loopback
address without one.
"""

import hmac
import os
from hashlib import sha256
from struct import pack

from twisted.python.filepath import FilePath

NONCE_BYTES = 32

# The sides of the handshake, bound into each proof.
LISTENER = b"p2pfiles-listener-v2"
CONNECTOR = b"p2pfiles-connector-v2"


class SecretError(Exception):
    """
    The secret file cannot be used; the string form says why, in one line.
    """


def makeNonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def transcript(side: bytes, exporter: bytes, connectorHello: bytes, listenerHello: bytes) -> bytes:
    """
    What a proof covers: each part prefixed by its length, so that no two
    different inputs make the same bytes.
    """
    return b"".join(pack("!I", len(part)) + part for part in (side, exporter, connectorHello, listenerHello))


def proof(secret: bytes, side: bytes, exporter: bytes, connectorHello: bytes, listenerHello: bytes) -> str:
    """
    The proof that the C{side} end of the connection whose exporter value
    is C{exporter}, where these two hellos were exchanged, knows C{secret}.
    """
    return hmac.new(secret, transcript(side, exporter, connectorHello, listenerHello), sha256).hexdigest()


def verify(
    secret: bytes, side: bytes, exporter: bytes, connectorHello: bytes, listenerHello: bytes, claimed: str
) -> bool:
    """
    Check a proof in constant time.
    """
    expected = proof(secret, side, exporter, connectorHello, listenerHello)
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
