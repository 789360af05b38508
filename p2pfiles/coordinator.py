"""
Who leads and who is a member, as the node asks it: L{ICoordinator}.

A coordinator answers three questions for the node — which id leads, in
which epoch, and which members are live — and says when any answer changes.
The built-in coordinator decides among the nodes themselves over their
control links; the etcd coordinator (L{p2pfiles.etcd}) leaves the decision to
an etcd cluster.  The node sees only this interface, so it runs the same
whichever decides.
"""

from typing import Callable, Dict, Optional

from zope.interface import Attribute, Interface


class MemberInfo:
    """
    One member as a coordinator knows it: its id, the address it listens on
    (C{HOST:PORT}) and, when it has one, the fingerprint of its certificate.
    """

    __slots__ = ("id", "address", "fingerprint")

    def __init__(self, id: int, address: str, fingerprint: Optional[str] = None) -> None:
        self.id = id
        self.address = address
        self.fingerprint = fingerprint

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemberInfo):
            return NotImplemented
        return (self.id, self.address, self.fingerprint) == (other.id, other.address, other.fingerprint)

    def __hash__(self) -> int:
        return hash((self.id, self.address, self.fingerprint))

    def __repr__(self) -> str:
        return f"MemberInfo(id={self.id!r}, address={self.address!r}, fingerprint={self.fingerprint!r})"


class CoordinatorError(Exception):
    """
    A coordinator could not do what was asked.

    @ivar code: a refusal code of the wire protocol, such as C{conflict} (the
        id is held by another live node) or C{unavailable} (the coordinator's
        backing service did not answer).
    @ivar message: one line for humans; also the string form.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message.splitlines()[0] if message else code

    def __str__(self) -> str:
        return self.message


class ICoordinator(Interface):
    """
    Leadership and membership of one node's cluster.
    """

    name = Attribute("'builtin' or 'etcd', shown in status --json as \"coordinator\"")

    def start():
        """
        Join; fires once registered.  Fails with
        C{CoordinatorError(code='conflict', ...)} if the id is already held by
        a live node (etcd: put-if-absent in a txn).
        """

    def stop():
        """
        Leave: stop acting as leader at once, then (etcd) revoke the lease so
        followers see the change at once.  Never claims anything while
        stopping.
        """

    def leader() -> Optional[int]:
        """
        The current leader's id; L{None} when unknown or when this node must
        not trust its view (etcd unreachable past the safe margin).
        """

    def epoch() -> int:
        """
        The current leadership's epoch (etcd: the leader key's
        create_revision); only goes up.
        """

    def isLeader() -> bool:
        """
        Whether this node leads now.
        """

    def members() -> Dict[int, MemberInfo]:
        """
        Live members, this node included.
        """

    def subscribe(callback: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{callback} (with no arguments) after any change of leader,
        epoch or members; returns a function that unsubscribes it.
        """
