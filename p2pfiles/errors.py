"""
The one error type of p2pfiles.

Every expected failure, wherever it happens (a node refusing a request, a
connection lost, a hash that does not match, a disk that is full), is a
L{P2PError} carrying one of the refusal codes below and a one-line reason.
The same code travels on the wire in an C{error} message, so a failure on a
node reaches a client unchanged.  Turning codes into process exit codes is the
command-line client's business alone (L{p2pfiles.cli}).

This module imports nothing else of the package.
"""

# The refusal codes, and what each means.
CODES = {
    "auth": "the other end does not share our cluster secret",
    "version": "the other end speaks another protocol version",
    "protocol": "the other end broke the protocol",
    "internal": "a bug on the end that reports it",
    "not-found": "no live node shares that file",
    "no-leader": "no leader is elected right now",
    "bad-name": "the file name is refused",
    "bad-offset": "a resume offset beyond the end of the file",
    "conflict": "something of that name or id exists already",
    "busy": "another download of the same destination is running",
    "changed": "a shared file changed since it was indexed",
    "timeout": "no answer in time",
    "verify": "the bytes received do not have the announced SHA-256",
    "unavailable": "no holder of the file could send it",
    "unreachable": "the node cannot be reached, or the connection was lost",
    "gone": "the other end went away during a transfer",
    "io": "reading or writing a local file failed",
    "usage": "the request or its options are wrong",
    "limit": "a limit of the node was reached",
    "transfer": "a transfer failed for another reason",
    "refused": "the node refused the request for a reason this end does not know",
}


class P2PError(Exception):
    """
    An expected failure: C{code} is one of L{CODES} and the string form is a
    one-line reason fit for a log line or a terminal.
    """

    def __init__(self, reason: str, code: str = "internal") -> None:
        if code not in CODES:
            # A peer may send any string: keep what it said, but as a
            # known code so that nothing downstream meets a surprise.
            reason = f"{reason} ({code[:40]!r})"
            code = "refused"
        super().__init__(reason)
        self.code = code

    @property
    def reason(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"P2PError({str(self)!r}, {self.code!r})"
