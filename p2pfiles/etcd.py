"""
Leadership and membership kept in etcd: L{EtcdCoordinator}, and
L{EtcdClient}, the small part of etcd's v3 JSON gateway it speaks.

What lies under C{PREFIX} (default C{/p2pfiles/default}):

  - C{PREFIX/members/<id>}: one key per live node, written put-if-absent under
    the node's lease; its value is C{{"address": "HOST:PORT", "fingerprint":
    ...}}.  A node whose lease lapses disappears with it.
  - C{PREFIX/leader}: the id of the leader (ASCII digits), written by that
    node under its own lease when no leader key exists and it is the smallest
    live id.  The leadership's epoch is this key's C{create_revision}: every
    new leadership creates the key anew, so epochs only go up.  A leader that
    sees a smaller live id deletes its key, and the smaller id claims next.

A node trusts its view only while its lease surely lives: if no keepalive has
been answered for C{ttl - margin} seconds since the last one was sent, it
reports no leader (and is no leader) until it has registered again under a
new lease.  Since the lease cannot have expired before then, no two nodes
lead at once while clocks run at about the same rate.

See "Who leads: the coordinator" in C{docs/design.md} for the whole story.
"""


import math
from typing import Any, Callable, Dict, Optional, Set, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from p2pfiles.coordinator import CoordinatorError, ICoordinator, MemberInfo

from p2pfiles.etcdclient import EtcdClient
# What callers and tests name as p2pfiles.etcd's, wherever it is defined.
from p2pfiles.etcdwire import Event, KeyValue, _Malformed, checkPrefix, compareModified, prefixEnd  # noqa: F401
from p2pfiles.etcdview import (
    PrefixFollower,
    PrefixView,
    Step,
    _Held,
    _shortKey,
    encodeMember,
    nextStep,
    parseMember,
)
from p2pfiles.etcdwire import (
    BACKOFF_CAP,
    BACKOFF_START,
    DEFAULT_PREFIX,
    DEFAULT_TTL,
    MAX_ID_DIGITS,
    MAX_KEYS,
    RangeResult,
    compareCreated,
    putOp,
    rangeOp,
)


class Registration:
    """
    This node's member key in etcd, and the lease it lives under.

    L{join} grants a lease of C{ttl} seconds and puts the member key under
    it if absent, reading the whole prefix in the same transaction.  Then
    L{maintain} keeps the lease alive every C{ttl / 3} seconds.  The lease
    is trusted only while it surely lives: until C{ttl - margin} after the
    last answered keepalive was sent.  When that passes, or etcd no longer
    knows the lease or the key (L{lose}), the registration is lost:
    C{onLost} is told at once, and a new lease is registered as soon as etcd
    answers.  The member key moves to the new lease in one transaction if
    it is still there, so that the other nodes see no change of members;
    only then is the old lease revoked.

    @ivar lease: the lease we hold and trust, or L{None}.
    @ivar memberRevision: the create_revision of our member key.
    @ivar abandoned: leases we stopped trusting and have not revoked yet.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        client: EtcdClient,
        me: MemberInfo,
        view: PrefixView,
        ttl: float,
        margin: float,
        onRegistered: Callable[[RangeResult], None],
        onRenewed: Callable[[], None],
        onLost: Callable[[str, int], None],
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.me = me
        self.view = view
        self.ttl = ttl
        self.margin = margin
        self.interval = ttl / 3
        self.attemptTimeout = ttl / 5
        self.memberKey = view.memberKey(me.id)
        self.onRegistered = onRegistered
        self.onRenewed = onRenewed
        self.onLost = onLost
        self.lease: Optional[int] = None
        self.memberRevision = 0
        self.abandoned: Set[int] = set()
        self._previousRevision = 0  # create_revision of our key under the last abandoned lease
        self._granted: Optional[int] = None  # a lease being registered
        self._safeUntil = 0.0
        self._lapseCall: Any = None
        self._running = False
        self._pending: Set[Deferred] = set()  # calls and naps that leave() cancels
        self._nap: Optional[Deferred] = None  # the maintenance loop's sleep
        self._loop: Optional[Deferred] = None
        self._problem: Optional[str] = None  # the etcd trouble last logged

    def trusted(self) -> bool:
        return self.lease is not None and self.reactor.seconds() < self._safeUntil

    async def join(self) -> None:
        """
        Register for the first time.  Fails with L{CoordinatorError}: code
        C{conflict} if another live node holds our id, C{unavailable} if etcd
        does not answer.
        """
        self._running = True
        waitUntil = None
        while True:
            try:
                await self._register()
                break
            except _Held as held:
                # Our own address: most likely this node's previous run, killed
                # before it could revoke its lease.  Wait for etcd to drop it.
                now = self.reactor.seconds()
                if held.address != self.me.address:
                    raise CoordinatorError("conflict", held.message) from None
                if waitUntil is None:
                    waitUntil = now + math.ceil(self.ttl) + 1.0
                    self.log.info(
                        "node id {id} is still registered in etcd at our address {address}, most likely by this "
                        "node's previous run: waiting up to {t:g}s for its lease to lapse",
                        id=self.me.id,
                        address=self.me.address,
                        t=waitUntil - now,
                    )
                if now >= waitUntil:
                    raise CoordinatorError("conflict", held.message) from None
                await self._sleep(self.interval)
                if not self._running:
                    raise CancelledError()
        self.log.info(
            "registered in etcd as node {id} under {prefix} (lease {lease:x}, revision {revision})",
            id=self.me.id,
            prefix=self.view.prefix,
            lease=self.lease,
            revision=self.memberRevision,
        )

    def maintain(self) -> None:
        """
        Keep the lease alive, and register again whenever it is lost, until
        L{leave}.
        """
        self._loop = Deferred.fromCoroutine(self._maintain())
        self._loop.addErrback(lambda f: self.log.failure("keeping our etcd registration failed", f))

    async def leave(self) -> None:
        """
        Stop keeping the lease, and revoke every lease we hold: our keys go
        with them at once.  Never fails.
        """
        self._running = False
        self._cancelLapse()
        for d in list(self._pending):
            d.cancel()
        if self._loop is not None:
            await self._loop
        leases = sorted(self.abandoned | {lease for lease in (self.lease, self._granted) if lease is not None})
        self.lease = self._granted = None
        self.abandoned.clear()
        for lease in leases:
            try:
                await self.client.revoke(lease)
            except Exception as e:
                self.log.warn(
                    "could not revoke lease {lease:x} ({why}); etcd drops it within {ttl:g}s",
                    lease=lease,
                    why=str(e) or type(e).__name__,
                    ttl=math.ceil(self.ttl),
                )

    def lose(self, why: str, keepKey: bool = True) -> None:
        """
        Stop trusting our lease at once; register again under a new lease as
        soon as etcd answers (keeping our member key if it is still there,
        unless C{keepKey} is false).
        """
        lease = self.lease
        if lease is None:
            return
        self.abandoned.add(lease)
        self.lease = None
        self._previousRevision = self.memberRevision if keepKey else 0
        self.memberRevision = 0
        self._cancelLapse()
        self.onLost(why, lease)
        if self._nap is not None:
            self._nap.cancel()

    # Registering.

    async def _register(self, previous: int = 0) -> None:
        """
        A new lease, then our member key under it, reading the whole prefix
        in the same transaction.

        The key is put if absent; or, given the C{create_revision} of the
        key we put before (C{previous}), if it is still that key.
        """
        view = self.view
        sent = self.reactor.seconds()
        lease, granted = await self._call(self.client.grant(math.ceil(self.ttl)))
        self._granted = lease
        try:
            while True:
                result = await self._call(
                    self.client.txn(
                        [compareCreated(self.memberKey, previous)],
                        [putOp(self.memberKey, encodeMember(self.me), lease), rangeOp(view.start, view.end, MAX_KEYS + 1)],
                        [rangeOp(self.memberKey)],
                    )
                )
                if not result.ranges:
                    raise CoordinatorError("protocol", "etcd's answer to our registration holds no range")
                if result.succeeded:
                    current = result.ranges[0]
                    memberRevision = previous or result.revision
                    break
                holder = result.ranges[0].kvs[0] if result.ranges[0].kvs else None
                if holder is None and previous:
                    # Our old key lapsed meanwhile: put it afresh.
                    previous = 0
                    continue
                if holder is None:
                    raise CoordinatorError("protocol", "etcd refused our registration yet holds no such key")
                if holder.lease != lease:
                    raise _Held(self.me.id, holder)
                # An earlier try of this transaction, sent to an endpoint that
                # then failed to answer, got through.
                memberRevision = holder.createRevision
                current = await self._call(self.client.range(view.start, view.end, MAX_KEYS + 1))
                break
        except BaseException:
            if self._running:
                await self._dropGranted()
            raise
        self._granted = None
        self.lease = lease
        self.memberRevision = memberRevision
        self._safeUntil = 0.0
        self._extend(sent, granted)
        self.onRegistered(current)

    async def _dropGranted(self) -> None:
        """
        Revoke the lease granted for a registration that failed.
        """
        lease, self._granted = self._granted, None
        if lease is None:
            return
        try:
            await self.client.revoke(lease)
        except CoordinatorError as e:
            self.log.info(
                "could not revoke unused lease {lease:x} ({why}); etcd drops it within {ttl:g}s",
                lease=lease,
                why=str(e),
                ttl=math.ceil(self.ttl),
            )

    async def _rejoin(self) -> None:
        """
        Register under a new lease, then revoke the one we stopped trusting:
        our leader key, if we held one, goes with it, so that a leadership
        never survives a loss of trust.
        """
        try:
            await self._register(self._previousRevision)
        except _Held as held:
            raise CoordinatorError("conflict", held.message) from None
        self._recovered()
        if self.lease is None:
            return  # lost again at once; the abandoned leases wait
        self._previousRevision = 0
        self.log.info(
            "registered in etcd again as node {id} (lease {lease:x}, revision {revision})",
            id=self.me.id,
            lease=self.lease,
            revision=self.memberRevision,
        )
        for old in sorted(self.abandoned):
            try:
                await self._call(self.client.revoke(old))
            except CoordinatorError as e:
                self.log.info(
                    "could not revoke our old lease {lease:x} ({why}); etcd drops it within {ttl:g}s",
                    lease=old,
                    why=str(e),
                    ttl=math.ceil(self.ttl),
                )
            self.abandoned.discard(old)

    # Keeping the lease.

    async def _maintain(self) -> None:
        # Retries come at least every TTL / 6, so that a node back in touch
        # with etcd soon after an outage registers again before its old
        # lease lapses there, and keeps its member key.
        cap = min(BACKOFF_CAP, self.ttl / 6)
        backoff = BACKOFF_START
        while self._running:
            try:
                if self.lease is None:
                    await self._rejoin()
                    # The lease was just granted; if it was lost at once,
                    # back off before trying again.
                    wait = self.interval if self.lease is not None else backoff
                    backoff = BACKOFF_START if self.lease is not None else min(backoff * 2, cap)
                else:
                    wait = await self._renew()
                    backoff = BACKOFF_START
            except CancelledError:
                continue
            except CoordinatorError as e:
                self._trouble(e)
                wait = backoff
                backoff = min(backoff * 2, cap)
            except Exception:
                self.log.failure("unexpected error keeping our etcd registration")
                wait = backoff = cap
            await self._sleep(wait, wakeable=True)

    async def _renew(self) -> float:
        """
        One keepalive; returns how long to wait before the next.
        """
        lease = self.lease
        assert lease is not None
        sent = self.reactor.seconds()
        ttl = await self._call(self.client.keepalive(lease, self.attemptTimeout))
        if self.lease != lease or not self._running:
            return 0.0
        if ttl <= 0:
            self.lose("etcd no longer knows our lease")
            return 0.0
        self._recovered()
        self._extend(sent, ttl)
        self.onRenewed()
        return max(0.0, sent + self.interval - self.reactor.seconds())

    def _extend(self, sent: float, ttl: int) -> None:
        """
        etcd renewed our lease for C{ttl} seconds after C{sent}: it lives
        until C{sent + ttl} at least, and we trust it until C{margin} before.
        """
        self._safeUntil = max(self._safeUntil, sent + min(float(ttl), self.ttl) - self.margin)
        self._cancelLapse()
        self._lapseCall = self.reactor.callLater(max(0.0, self._safeUntil - self.reactor.seconds()), self._lapsed)

    def _cancelLapse(self) -> None:
        if self._lapseCall is not None and self._lapseCall.active():
            self._lapseCall.cancel()
        self._lapseCall = None

    def _lapsed(self) -> None:
        self._lapseCall = None
        if self._running:
            self.lose(f"no keepalive answered for {self.ttl - self.margin:g}s, so our lease may lapse")

    def _trouble(self, error: CoordinatorError) -> None:
        """
        Log what went wrong with etcd, once until it answers again.
        """
        if str(error) != self._problem:
            self._problem = str(error)
            if error.code == "conflict":
                self.log.error("cannot register: {why}; trying again", why=str(error))
            else:
                self.log.warn("etcd: {why}", why=str(error))

    def _recovered(self) -> None:
        if self._problem is not None:
            self._problem = None
            self.log.info("etcd answers again")

    async def _call(self, d: Deferred) -> Any:
        self._pending.add(d)
        try:
            return await d
        finally:
            self._pending.discard(d)

    async def _sleep(self, seconds: float, wakeable: bool = False) -> None:
        d = deferLater(self.reactor, seconds, lambda: None)
        if wakeable:
            self._nap = d
        try:
            await self._call(d)
        except CancelledError:
            pass
        finally:
            if self._nap is d:
                self._nap = None


@implementer(ICoordinator)
class EtcdCoordinator:
    """
    Leadership and membership from etcd, for node C{me}.

    Three parts do the work: a L{Registration} keeps our member key under a
    lease we trust (or tells us at once when we must not), a
    L{PrefixFollower} keeps a L{PrefixView} of the prefix current, and
    L{nextStep} says what to do about the leader key.  This class wires them,
    answers the node's questions, and tells subscribers of changes.
    """

    name = "etcd"
    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        client: EtcdClient,
        me: MemberInfo,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        margin: Optional[float] = None,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 1:
            raise ValueError(f"the lease TTL must be at least 1 second, not {ttl!r}")
        if isinstance(me.id, bool) or not isinstance(me.id, int) or not 0 <= me.id < 10**MAX_ID_DIGITS:
            raise ValueError(f"node id {me.id!r} must be a non-negative integer of at most {MAX_ID_DIGITS} digits")
        parseMember(me.id, encodeMember(me))
        self.reactor = reactor
        self.client = client
        self.me = me
        self.ttl = float(ttl)
        # The margin covers our timers firing late and clocks running at
        # slightly different rates; renewals come three times a TTL, so one
        # lost renewal never costs the lease.
        self.margin = self.ttl / 4 if margin is None else margin
        if not 0 < self.margin < self.ttl * 2 / 3:
            raise ValueError(f"the margin must be between 0 and two thirds of the TTL, not {self.margin!r}")
        self._view = PrefixView(prefix)
        self._registration = Registration(
            reactor, client, me, self._view, self.ttl, self.margin, self._registered, self._renewed, self._lost
        )
        self._follower = PrefixFollower(reactor, client, self._view, self._viewChanged)
        self._state = "new"  # -> running -> stopping -> stopped
        self._epoch = 0
        self._resigning: Set[int] = set()  # epochs we lead but are handing over
        self._transactions: Set[Deferred] = set()
        self._subscribers: Dict[int, Callable[[], None]] = {}
        self._nextSubscriber = 0
        self._last: Optional[Tuple[Any, ...]] = None
        self._started: Optional[Deferred] = None
        self._stopped: Optional[Deferred] = None

    # What the node asks.

    def _trusted(self) -> bool:
        return self._state == "running" and self._registration.trusted() and not self._view.overfull

    def isLeader(self) -> bool:
        if not self._trusted():
            return False
        claim = self._view.leaderClaim()
        return (
            claim is not None
            and claim[0] == self.me.id
            and claim[1].lease == self._registration.lease
            and claim[1].createRevision not in self._resigning
        )

    def leader(self) -> Optional[int]:
        if not self._trusted():
            return None
        claim = self._view.leaderClaim()
        if claim is None or (claim[0] == self.me.id and not self.isLeader()):
            return None
        return claim[0]

    def epoch(self) -> int:
        return self._epoch

    def members(self) -> Dict[int, MemberInfo]:
        members = self._view.members()
        members[self.me.id] = self.me
        return members

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        key = self._nextSubscriber
        self._nextSubscriber += 1
        self._subscribers[key] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    # Joining and leaving.

    def start(self) -> Deferred:
        if self._state != "new":
            raise RuntimeError("an EtcdCoordinator starts once")
        self._state = "running"
        self._started = Deferred(lambda d: self.stop())
        Deferred.fromCoroutine(self._run()).addErrback(lambda f: self.log.failure("the etcd coordinator failed", f))
        return self._started

    async def _run(self) -> None:
        assert self._started is not None
        try:
            await self._registration.join()
        except BaseException:
            failure = Failure()
            if self._state == "running":
                self._state = "stopped"
            if not self._started.called:
                if failure.check(CancelledError):
                    failure = Failure(CoordinatorError("unavailable", "stopped before joining etcd"))
                self._started.errback(failure)
            return
        self._started.callback(None)
        self._registration.maintain()

    def stop(self) -> Deferred:
        if self._state == "new":
            self._state = "stopped"
        if self._stopped is None:
            if self._state == "stopped":
                return Deferred.fromCoroutine(_nothing())
            leading = self.isLeader()
            self._state = "stopping"
            self._changed()
            if leading:
                self.log.info("stepping down: leaving etcd")
            self._follower.stop()
            for d in list(self._transactions):
                d.cancel()
            self._stopped = Deferred.fromCoroutine(self._release())
        done: Deferred = Deferred()
        self._stopped.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    async def _release(self) -> None:
        await self._registration.leave()
        self._state = "stopped"
        self._changed()

    # What the registration says.

    def _registered(self, current: RangeResult) -> None:
        self._resigning.clear()
        self._view.reset(current)
        self._viewChanged()
        self._follower.start()

    def _renewed(self) -> None:
        if self._follower.endpoint not in (None, self.client.current):
            self.log.info("moving the etcd watch to {endpoint}", endpoint=self.client.current)
            self._follower.start()
        self._reconsider()
        self._changed()

    def _lost(self, why: str, lease: int) -> None:
        claim = self._view.leaderClaim()
        leading = claim is not None and claim[0] == self.me.id and claim[1].lease == lease
        self.log.warn(
            "{what}: {why}; registering again once etcd answers",
            what="stepping down" if leading else "no longer trusting etcd",
            why=why,
        )
        self._resigning.clear()
        self._follower.stop()
        self._changed()

    # Deciding.

    def _viewChanged(self) -> None:
        view = self._view
        claim = view.leaderClaim()
        if claim is not None and claim[1].createRevision > self._epoch:
            self._epoch = claim[1].createRevision
        standing = view.entry(view.leaderKey)
        self._resigning = {r for r in self._resigning if standing is not None and standing.createRevision == r}
        registration = self._registration
        if registration.lease is not None and view.revision >= registration.memberRevision and not view.overfull:
            mine = view.entry(registration.memberKey)
            if mine is None or mine.lease != registration.lease or mine.createRevision != registration.memberRevision:
                registration.lose("our member key was removed from etcd or replaced", keepKey=False)
                return
        self._reconsider()
        self._changed()

    def _reconsider(self) -> None:
        """
        Take the next step towards the smallest live id leading, if it is
        ours to take.
        """
        lease = self._registration.lease
        if not self._trusted() or self._transactions or lease is None:
            return
        step = nextStep(self._view, self.me.id, lease, self._registration.memberRevision, self._registration.abandoned)
        if step is None:
            return
        if step.handingOver and step.epoch not in self._resigning:
            self._resigning.add(step.epoch)
            self.log.info(
                "node {smaller} is live: handing over the leadership of epoch {epoch}",
                smaller=self._view.smallest(),
                epoch=step.epoch,
            )
        elif step.what == "clear the leader key":
            standing = self._view.entry(self._view.leaderKey)
            self.log.warn(
                "clearing a leader key that names no live member: {value}",
                value=_shortKey(standing.value if standing is not None else b""),
            )
        self._transact(step)

    def _transact(self, step: Step) -> None:
        """
        Run one step's transaction; whatever it changed arrives through the
        watch.
        """
        d = self.client.txn(step.compare, step.success)
        self._transactions.add(d)

        def failed(reason: Failure) -> None:
            if reason.check(CancelledError):
                return
            if reason.check(CoordinatorError):
                self.log.info("could not {what}: {why}", what=step.what, why=reason.getErrorMessage())
            else:
                self.log.failure("could not {what}", reason, what=step.what)

        d.addCallbacks(lambda result: None, failed)
        d.addBoth(lambda _: self._transactions.discard(d))

    def _changed(self) -> None:
        """
        Tell subscribers if the leader, the epoch or the members changed.
        """
        leader, epoch, leading = self.leader(), self.epoch(), self.isLeader()
        members = tuple(sorted((m.id, m.address, m.fingerprint) for m in self.members().values()))
        snapshot = (leader, epoch, leading, members)
        if snapshot == self._last:
            return
        previous, self._last = self._last, snapshot
        if previous is None or previous[:3] != snapshot[:3]:
            if leading:
                self.log.info(
                    "node {me} leads epoch {epoch} (members {members})",
                    me=self.me.id,
                    epoch=epoch,
                    members=", ".join(str(m[0]) for m in members),
                )
            elif leader is not None:
                self.log.info("following {leader} in epoch {epoch}", leader=leader, epoch=epoch)
            elif previous is not None and previous[0] is not None:
                self.log.info("no leader")
        for callback in list(self._subscribers.values()):
            try:
                callback()
            except Exception:
                self.log.failure("a coordinator subscriber failed")


async def _nothing() -> None:
    return None

