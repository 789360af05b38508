"""
What a connection's security layer tells the handshake: L{IConnectionSecurity}
(how this end secures its connections) and L{IChannelBinding} (what one
secured connection is bound to).

The protocol proves the cluster secret over the channel binding of its own
connection, so a proof is worth nothing on any other connection.  The one
implementation in the package is TLS (L{p2pfiles.tls}); tests may give the
protocol a fixed binding to drive its handshake without TLS.

This module imports nothing else of the package.
"""

from typing import Optional

from twisted.python.failure import Failure
from zope.interface import Attribute, Interface


class ChannelError(Exception):
    """
    A connection cannot be bound: it is not secured the way this end
    requires.  The string form is one line.
    """


class IChannelBinding(Interface):
    """
    What one secured connection is bound to.
    """

    def exporter():
        """
        Keying material exported from this connection's security layer
        (for TLS, RFC 5705 with the label C{EXPORTER-p2pfiles-v2}): the same
        bytes at both ends of this connection, and different on any other.
        """

    def peerFingerprint():
        """
        The C{sha256:...} fingerprint of the certificate the other end
        presented, or None if it presented none.
        """

    def carryBulk(size):
        """
        From now on the connection carries file bytes: read and send in
        blocks of up to C{size} bytes, and pause a producer writing to it
        only when C{size} bytes wait to be sent.  Never lowers a size; other
        connections keep the small defaults, so that one that is not read
        costs little memory.
        """


class IConnectionSecurity(Interface):
    """
    How this end secures its connections.
    """

    fingerprint = Attribute("this end's own certificate fingerprint, or None (a client has no certificate)")

    def wrapClient(endpoint, clock):
        """
        An endpoint that connects through C{endpoint} and secures the
        connection; it fires with the protocol inside the security layer.
        C{clock} is the reactor the layer may schedule on.
        """

    def wrapServer(endpoint, clock):
        """
        An endpoint that listens through C{endpoint} and secures every
        connection it accepts.
        """

    def connected(protocol):
        """
        C{protocol}'s connection was made: arrange for
        C{protocol.handshakeCompleted()} to be called once the connection is
        secure.  (TLS calls it itself when its handshake is done.)
        """

    def binding(transport):
        """
        The L{IChannelBinding} of the secured connection under C{transport};
        raise L{ChannelError} if it is not secured.
        """


def closeReason(reason: Optional[Failure]) -> str:
    """
    A one-line account of why a connection closed.  OpenSSL's errors are a
    list of (library, function, reason) tuples: keep the reasons.
    """
    if reason is None:
        return "no reason given"
    value = reason.value
    stack = value.args[0] if getattr(value, "args", None) else None
    if isinstance(stack, list) and stack and all(isinstance(e, tuple) and e for e in stack):
        return "TLS: " + "; ".join(str(e[-1]) for e in stack)
    return reason.getErrorMessage().splitlines()[0] if reason.getErrorMessage() else type(value).__name__
