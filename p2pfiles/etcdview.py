"""
What lies under the cluster's etcd prefix, as one node sees it: member
values, L{PrefixView}, L{PrefixFollower} that keeps it current from a
watch, and L{nextStep}, the pure decision of what to claim or hand over.
See L{p2pfiles.etcd}.
"""

import json
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from p2pfiles.address import parseAddress
from p2pfiles.coordinator import CoordinatorError, MemberInfo

from p2pfiles.etcdclient import EtcdClient
from p2pfiles.etcdwire import (
    BACKOFF_CAP,
    BACKOFF_START,
    EtcdWatch,
    Event,
    KeyValue,
    MAX_ADDRESS,
    MAX_FINGERPRINT,
    MAX_KEYS,
    MAX_MEMBER_VALUE,
    RangeResult,
    _canonicalId,
    _refuseConstant,
    checkPrefix,
    compareCreated,
    compareModified,
    deleteOp,
    prefixEnd,
    putOp,
)


def encodeMember(member: MemberInfo) -> bytes:
    """
    The value of a member's key: C{{"address": ..., "fingerprint": ...}}, the
    fingerprint left out when there is none.
    """
    value: Dict[str, str] = {"address": member.address}
    if member.fingerprint is not None:
        value["fingerprint"] = member.fingerprint
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _printable(text: str) -> bool:
    return all(33 <= ord(c) < 127 for c in text)


def parseMember(id: int, value: bytes) -> MemberInfo:
    """
    The member C{id} as described by the value of its key; raise
    L{ValueError} with a one-line reason if the value is not one.  Unknown
    fields are ignored, so that a later version may add some.
    """
    if len(value) > MAX_MEMBER_VALUE:
        raise ValueError(f"value of {len(value)} bytes (at most {MAX_MEMBER_VALUE})")
    try:
        data = json.loads(value.decode("utf-8"), parse_constant=_refuseConstant)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("value is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("value is not a JSON object")
    address = data.get("address")
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS or not _printable(address):
        raise ValueError(f"address is not printable ASCII of at most {MAX_ADDRESS} characters")
    parseAddress(address)
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and (
        not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= MAX_FINGERPRINT or not _printable(fingerprint)
    ):
        raise ValueError(f"fingerprint is not printable ASCII of at most {MAX_FINGERPRINT} characters")
    return MemberInfo(id, address, fingerprint)


def _shortKey(key: bytes) -> str:
    return repr(key[:80]) + ("..." if len(key) > 80 else "")


class PrefixView:
    """
    The keys under one prefix as of C{revision}, fed with etcd's answers (a
    range, then watch events): who the members are, and which leader key
    stands.  It knows nothing of connections or time.

    Every key is checked where it enters: a member key must end in a
    canonical decimal id and hold a valid member value, a leader key must
    hold a canonical id.  Anything else is ignored with one log line.  More
    than C{maxKeys} keys make the view C{overfull}: it is not to be trusted
    until it has been read afresh with fewer.
    """

    log = Logger()

    def __init__(self, prefix: str, maxKeys: Optional[int] = None) -> None:
        self.prefix = checkPrefix(prefix)
        self.start = (prefix + "/").encode("ascii")
        self.end = prefixEnd(self.start)
        self.leaderKey = self.start + b"leader"
        self._membersStart = self.start + b"members/"
        self.maxKeys = MAX_KEYS if maxKeys is None else maxKeys
        self.revision = 0
        self.overfull = False
        self._kvs: Dict[bytes, KeyValue] = {}
        self._members: Dict[int, Tuple[MemberInfo, KeyValue]] = {}

    def memberKey(self, id: int) -> bytes:
        return self._membersStart + str(id).encode("ascii")

    # Input.

    def reset(self, result: RangeResult) -> None:
        """
        Start again from a range of the whole prefix.
        """
        self._kvs.clear()
        self._members.clear()
        self.overfull = False
        for kv in result.kvs:
            self._put(kv)
        if result.more and not self.overfull:
            self._overflow()
        self.revision = result.revision

    def apply(self, events: List[Event]) -> None:
        for event in events:
            if event.deleted:
                self._delete(event.kv.key)
            else:
                self._put(event.kv)
            self.revision = max(self.revision, event.kv.modRevision)

    def _overflow(self) -> None:
        self.overfull = True
        self.log.error(
            "more than {max} keys under {prefix} in etcd: not trusting them until there are fewer",
            max=self.maxKeys,
            prefix=self.prefix,
        )

    def _put(self, kv: KeyValue) -> None:
        if not kv.key.startswith(self.start):
            return
        if kv.key not in self._kvs and len(self._kvs) >= self.maxKeys:
            if not self.overfull:
                self._overflow()
            return
        self._kvs[kv.key] = kv
        if kv.key == self.leaderKey:
            if _canonicalId(kv.value.decode("ascii", "replace")) is None:
                self.log.warn("ignored the leader key in etcd: {value} is not a node id", value=_shortKey(kv.value))
        elif kv.key.startswith(self._membersStart):
            id = self._memberId(kv.key)
            if id is None:
                self.log.warn("ignored etcd key {key}: not a member id", key=_shortKey(kv.key))
                return
            self._members.pop(id, None)
            try:
                self._members[id] = (parseMember(id, kv.value), kv)
            except ValueError as e:
                self.log.warn("ignored member {id} in etcd: {why}", id=id, why=str(e))

    def _delete(self, key: bytes) -> None:
        self._kvs.pop(key, None)
        if key.startswith(self._membersStart):
            id = self._memberId(key)
            if id is not None:
                self._members.pop(id, None)

    def _memberId(self, key: bytes) -> Optional[int]:
        return _canonicalId(key[len(self._membersStart) :].decode("ascii", "replace"))

    # What it says.

    def entry(self, key: bytes) -> Optional[KeyValue]:
        return self._kvs.get(key)

    def members(self) -> Dict[int, MemberInfo]:
        return {id: info for id, (info, kv) in self._members.items()}

    def smallest(self) -> Optional[int]:
        return min(self._members) if self._members else None

    def leaderClaim(self) -> Optional[Tuple[int, KeyValue]]:
        """
        The leader id and its key, if the leader key names a live member and
        was written under that member's lease (both go when it does).
        """
        kv = self._kvs.get(self.leaderKey)
        if kv is None or kv.lease == 0:
            return None
        id = _canonicalId(kv.value.decode("ascii", "replace"))
        member = self._members.get(id) if id is not None else None
        if member is None or member[1].lease != kv.lease:
            return None
        return id, kv


class PrefixFollower:
    """
    Keeps a L{PrefixView} current: watches the prefix from the revision
    after the view's, resumes a broken watch from there (backing off, up to
    a second), and reads the prefix afresh when etcd has compacted the
    history the watch needs, sends something it cannot read, or the view
    overflowed.  Calls C{onChange} after each change of the view.
    """

    log = Logger()

    def __init__(self, reactor: IReactorTime, client: EtcdClient, view: PrefixView, onChange: Callable[[], None]) -> None:
        self.reactor = reactor
        self.client = client
        self.view = view
        self.onChange = onChange
        self._token: Optional[object] = None
        self._watch: Optional[EtcdWatch] = None
        self._pending: Set[Deferred] = set()

    @property
    def endpoint(self) -> Optional[str]:
        """
        The endpoint the watch under way reached, if any.
        """
        return self._watch.endpoint if self._watch is not None else None

    def start(self) -> None:
        """
        (Re)start following, from the revision after the view's.
        """
        self.stop()
        token = self._token = object()
        d = Deferred.fromCoroutine(self._follow(token))
        d.addErrback(lambda f: self.log.failure("following etcd failed", f))

    def stop(self) -> None:
        self._token = None
        self._watch = None
        for d in list(self._pending):
            d.cancel()

    async def _wait(self, d: Deferred) -> Any:
        self._pending.add(d)
        try:
            return await d
        finally:
            self._pending.discard(d)

    async def _follow(self, token: object) -> None:
        view = self.view
        backoff = BACKOFF_START
        reread = False
        problem = None
        while self._token is token:
            try:
                if reread:
                    current = await self._wait(self.client.range(view.start, view.end, MAX_KEYS + 1))
                    if self._token is not token:
                        return
                    view.reset(current)
                    self.onChange()
                    reread = False
                watch = self.client.watch(
                    view.start, view.end, view.revision + 1, lambda events: self._watched(token, events)
                )
                self._watch = watch
                end = await self._wait(watch.done)
                if watch.received:
                    backoff = BACKOFF_START
                    problem = None
                if end.compactRevision:
                    self.log.info(
                        "etcd compacted its history past revision {revision}: reading {prefix} afresh",
                        revision=end.compactRevision,
                        prefix=view.prefix,
                    )
                    reread = True
                else:
                    self.log.info("etcd ended the watch ({why}); resuming", why=end.reason)
            except CancelledError:
                if self._token is not token:
                    return
                reread = True  # cancelled by _watched, to read afresh
            except CoordinatorError as e:
                if self._token is not token:
                    return
                reread = reread or e.code == "protocol"
                if str(e) != problem:
                    problem = str(e)
                    self.log.info("etcd watch: {why}; trying again", why=problem)
            except Exception:
                if self._token is not token:
                    return
                self.log.failure("unexpected error following etcd; reading it afresh")
                reread = True
            if self._token is token:
                self._watch = None
            try:
                await self._wait(deferLater(self.reactor, backoff, lambda: None))
            except CancelledError:
                return
            backoff = min(backoff * 2, BACKOFF_CAP)

    def _watched(self, token: object, events: List[Event]) -> None:
        if self._token is not token:
            return
        self.view.apply(events)
        self.onChange()
        if self.view.overfull and self._watch is not None:
            self._watch.cancel()


class Step(NamedTuple):
    """
    A transaction that moves the cluster towards the smallest live id
    leading.

    @ivar handingOver: whether it deletes this node's own leader key
        (a smaller id is live), C{epoch} being that leadership's.
    """

    what: str
    compare: List[Dict[str, Any]]
    success: List[Dict[str, Any]]
    handingOver: bool = False
    epoch: int = 0


def nextStep(view: PrefixView, me: int, lease: int, memberRevision: int, abandoned: Iterable[int] = ()) -> Optional[Step]:
    """
    What node C{me} (registered under C{lease}, its key created at
    C{memberRevision}) should do about the leader key, as C{view} stands:

      - no leader key, and C{me} is the smallest live id: claim it, under
        our lease, if our registration still stands;
      - our own leader key, and a smaller id is live: hand over (delete it,
        if it is still that leadership's key);
      - a leader key that names no live member under that member's lease,
        and C{me} is the smallest live id: clear it (if unchanged) so that a
        claim can follow — unless it is ours under an C{abandoned} lease,
        which goes when we revoke that lease;
      - otherwise nothing: some other node leads, or must act first.
    """
    standing = view.entry(view.leaderKey)
    claim = view.leaderClaim()
    smallest = view.smallest()
    if standing is None:
        if smallest != me:
            return None
        return Step(
            "claim the leadership",
            [compareCreated(view.leaderKey, 0), compareCreated(view.memberKey(me), memberRevision)],
            [putOp(view.leaderKey, str(me).encode("ascii"), lease)],
        )
    if claim is not None and claim[0] == me and standing.lease == lease:
        if smallest is None or smallest >= me:
            return None
        return Step(
            "hand over the leadership",
            [compareCreated(view.leaderKey, standing.createRevision)],
            [deleteOp(view.leaderKey)],
            handingOver=True,
            epoch=standing.createRevision,
        )
    if claim is None and smallest == me and standing.lease not in set(abandoned):
        return Step(
            "clear the leader key",
            [compareModified(view.leaderKey, standing.modRevision)],
            [deleteOp(view.leaderKey)],
        )
    return None


class _Held(Exception):
    """
    Our id is registered under another lease.
    """

    def __init__(self, id: int, holder: KeyValue) -> None:
        try:
            self.address: Optional[str] = parseMember(id, holder.value).address
        except ValueError:
            self.address = None
        self.message = f"node id {id} is already registered in etcd by {self.address or 'a node with an unreadable value'}"
        super().__init__(self.message)


