"""
A coordinator that decides elsewhere, as the node sees it:
L{ExternalCoordinator}.

The node asks its coordinator the questions of L{INodeCoordinator} and feeds
it what its control links see.  The built-in election answers from those
inputs; a coordinator such as etcd's (L{p2pfiles.etcd.EtcdCoordinator})
decides without them and answers only L{ICoordinator}.  This adapter gives
it the rest: a role and liveness read from its answers, link and heartbeat
inputs taken and ignored (no heartbeat is sent or read), stale epochs
refused, and every member it reports learned, so that the node links to it
for index traffic as usual.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from p2pfiles.coordinator import ICoordinator, INodeCoordinator, MemberInfo
from p2pfiles.etcd import EtcdClient, EtcdCoordinator
from p2pfiles.waiting import Once

__all__ = ["ExternalCoordinator", "etcdCoordinator"]


@implementer(INodeCoordinator)
class ExternalCoordinator:
    """
    The node's view of an L{ICoordinator} that decides on its own.

    The coordinator is made when this one starts (C{make}), not before: what
    it registers, such as the node's certificate fingerprint, may not exist
    until the node starts.

    @ivar coordinator: the wrapped coordinator once started, else L{None}.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        me: int,
        make: Callable[[], ICoordinator],
        learn: Callable[[int, str], bool],
        close: Callable[[], Deferred] = lambda: succeed(None),
    ) -> None:
        """
        @param name: what C{status --json} calls it (C{"etcd"}).
        @param learn: called with C{(id, address)} for every member the
            coordinator reports, as the membership's C{learn}.
        @param close: called once the coordinator has stopped, to release
            what it used (its etcd client's connections).
        """
        self.name = name
        self.me = me
        self.make = make
        self.learn = learn
        self.close = close
        self.coordinator: Optional[ICoordinator] = None
        self.stopping = False
        self._subscribers: List[Callable[[], None]] = []
        self._unsubscribe: Callable[[], None] = lambda: None
        # The last stale epoch logged for each sender: a stale leader asks
        # again and again until it learns better, and one line says it all.
        self._refused: Dict[int, int] = {}
        self._stopped: Optional[Once] = None

    # ICoordinator

    def start(self) -> Deferred:
        """
        Make the coordinator and start it; fires once it has admitted this
        node, or fails as its C{start()} does (C{CoordinatorError}, code
        C{conflict} or C{unavailable}).
        """
        if self.coordinator is not None or self.stopping:
            raise RuntimeError("an ExternalCoordinator starts once, and not after it stopped")
        self.coordinator = self.make()
        self._unsubscribe = self.coordinator.subscribe(self._changed)
        return self.coordinator.start()

    def stop(self) -> Deferred:
        """
        Stop leading at once (subscribers hear of it before this returns),
        then stop the coordinator (it leaves) and close what it used.  Never
        fails.
        """
        leading = self.isLeader()
        self.stopping = True
        if leading:
            self._tell()
        if self._stopped is None:
            self._stopped = Once()
            Deferred.fromCoroutine(self._stop()).addBoth(self._stopped.fire)
        return self._stopped.wait()

    async def _stop(self) -> None:
        if self.coordinator is not None:
            try:
                await self.coordinator.stop()
            except Exception:
                self.log.failure("error stopping the {name} coordinator", name=self.name)
        self._unsubscribe()
        try:
            await self.close()
        except Exception:
            self.log.failure("error closing the {name} coordinator's connections", name=self.name)

    def leader(self) -> Optional[int]:
        return None if self.coordinator is None else self.coordinator.leader()

    def epoch(self) -> int:
        return 0 if self.coordinator is None else self.coordinator.epoch()

    def isLeader(self) -> bool:
        return self.coordinator is not None and not self.stopping and self.coordinator.isLeader()

    def members(self) -> Dict[int, MemberInfo]:
        return {} if self.coordinator is None else self.coordinator.members()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    # What the node asks beyond ICoordinator.

    def role(self) -> str:
        if self.isLeader():
            return "leader"
        return "candidate" if self.leader() is None else "follower"

    def isLive(self, member: int) -> bool:
        return member == self.me or member in self.members()

    def rejectStale(self, sender: int, epoch: int) -> bool:
        """
        Refuse a message from an epoch older than ours.  Nobody is told: the
        sender learns the current epoch from the coordinator itself.
        """
        current = self.epoch()
        if epoch >= current:
            return False
        if self._refused.get(sender) != epoch:
            self._refused[sender] = epoch
            self.log.info(
                "rejected message from {sender}: stale epoch {old} < {current}",
                sender=sender,
                old=epoch,
                current=current,
            )
        return True

    # Inputs from the links: the coordinator decides without them.

    def linkUp(self, member: int) -> None:
        pass

    def linkDown(self, member: int) -> None:
        pass

    def heartbeatReceived(self, sender: int, message: Any) -> None:
        pass

    def staleReceived(self, sender: int, message: Any) -> None:
        pass

    # Changes.

    def _changed(self) -> None:
        """
        The coordinator's answers changed: learn the members it reports,
        then tell the subscribers.
        """
        if not self.stopping:
            for member, info in sorted(self.members().items()):
                if member != self.me:
                    self.learn(member, info.address)
        self._tell()

    def _tell(self) -> None:
        for callback in list(self._subscribers):
            callback()


def etcdCoordinator(
    reactor: Any,
    endpoints: Sequence[str],
    prefix: str,
    ttl: float,
    me: int,
    address: str,
    fingerprint: Callable[[], Optional[str]],
    learn: Callable[[int, str], bool],
) -> ExternalCoordinator:
    """
    The node's coordinator when etcd decides: one L{EtcdClient} for
    C{endpoints}, and an L{EtcdCoordinator} on it, under C{prefix} with
    leases of C{ttl} seconds, made when the node starts to register node
    C{me} at C{address} with its certificate's C{fingerprint()}.  The client
    is closed once the coordinator has left.
    """
    client = EtcdClient(reactor, list(endpoints))

    def make() -> ICoordinator:
        return EtcdCoordinator(reactor, client, MemberInfo(me, address, fingerprint()), prefix, ttl)

    return ExternalCoordinator("etcd", me, make, learn, client.close)
