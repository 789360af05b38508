"""
Tests for L{p2pfiles.wire}: the frame codec, its schemas, its frame limit
and the splitting of long lists into frames that fit it.
"""

import json
import math
import re

from typing import Iterator, List

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.protocol import P2PProtocol
from p2pfiles.wire import (
    CONTROL,
    ENTRIES_PER_FRAME,
    ENVELOPE_ROOM,
    ITEM_BUDGET,
    MAX_FRAME,
    MAX_FILE_SIZE,
    PROTOCOL_VERSION,
    SCHEMAS,
    FileEntry,
    Message,
    WireError,
    chunked,
    decode,
    deltaFrames,
    encode,
    iterUpdate,
    splitEntries,
    splitListing,
    splitUpdate,
)

SHA = "0123456789abcdef" * 4
# An incarnation as a node's local index makes them: 16 hex digits.
INCARNATION = "5eed0123456789ab"

# Property tests: enough examples to find edge cases, no deadline (a loaded CI
# machine must not turn a slow example into a failure), no example database
# written into the work tree.
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def frame(body: object) -> bytes:
    """
    A control frame whose JSON payload is C{body}.
    """
    return CONTROL + json.dumps(body).encode("utf-8")


def entryDict(**overrides: object) -> dict:
    value = {"name": "a.txt", "size": 3, "mtime": 1.5, "sha256": SHA}
    value.update(overrides)
    return value


def indexDelta(*entries: object) -> bytes:
    """
    An C{index-delta} frame holding C{entries} (JSON objects, possibly
    broken) and no removed names.
    """
    return frame(
        {
            "type": "index-delta",
            "incarnation": INCARNATION,
            "seq": 1,
            "full": False,
            "entries": list(entries),
            "removed": [],
            "last": True,
        }
    )


# One plain, valid example of every message type.
EXAMPLES = {
    "hello": dict(
        version=2, role="node", node=1, nonce="ab" * 32, address="h:1", purpose="control", fingerprint="sha256:" + "ef" * 32
    ),
    "auth": dict(proof="cd" * 32),
    "ready": dict(node=None),
    "error": dict(code="auth", reason="wrong secret"),
    "heartbeat": dict(node=1, epoch=2, leader=1, members=[(1, "h:1"), (2, "h:2")]),
    "stale": dict(epoch=3, leader=None),
    "index-changed": dict(epoch=3, incarnation=INCARNATION, seq=7),
    "index-since": dict(incarnation=INCARNATION, since=5),
    "index-delta": dict(
        incarnation=INCARNATION, seq=7, full=False, entries=[FileEntry("b", 0, 0.0, SHA)], removed=["c"], last=True
    ),
    "status": dict(watch=False),
    "state": dict(status={"leader": 1, "members": [1, 2], "epoch": 3}),
    "ls": dict(),
    "listing": dict(files=[{"name": "a", "holders": [1]}], last=True),
    "redirect": dict(leader=1, address="h:1"),
    "get": dict(name="a", offset=0, sha256=SHA),
    "file": dict(name="a", size=1, sha256=SHA, offset=0, holder=2, leader=1),
    "fetch": dict(name="a", overwrite=True),
    "progress": dict(name="a", bytes=1, size=2),
    "fetched": dict(name="a", size=1, sha256=SHA, already=False),
    "lookup": dict(name="a"),
    "found": dict(name="a", size=1, sha256=SHA, holders=[{"node": 1, "address": "h:1"}]),
}


# Valid field values, one strategy per kind of checker.

ids = st.integers(min_value=0, max_value=2**64)
optionalIds = st.none() | ids
# Any Unicode scalar value: newlines, NUL, quotes, backslashes, U+2028, astral.
texts = st.text()
optionalTexts = st.none() | texts
bools = st.booleans()
sha256s = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
fileSizes = st.integers(min_value=0, max_value=MAX_FILE_SIZE)
fileEntries = st.builds(
    FileEntry,
    name=texts,
    size=fileSizes,
    mtime=st.floats(allow_nan=False, allow_infinity=False),
    sha256=sha256s,
)
entryLists = st.lists(fileEntries, max_size=5)
members = st.lists(st.tuples(ids, texts), max_size=5)
finiteJSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
jsonObjects = st.dictionaries(st.text(), finiteJSON, max_size=4)

# The fields of every message type and how to generate valid values for them.
# test_fieldStrategiesMatchSchemas keeps this table in step with SCHEMAS.
FIELDS = {
    "hello": {
        "version": ids,
        "role": texts,
        "node": optionalIds,
        "nonce": texts,
        "address": optionalTexts,
        "purpose": texts,
        "fingerprint": st.none() | sha256s.map(lambda h: "sha256:" + h),
    },
    "auth": {"proof": texts},
    "ready": {"node": optionalIds},
    "error": {"code": texts, "reason": texts},
    "heartbeat": {"node": ids, "epoch": ids, "leader": optionalIds, "members": members},
    "stale": {"epoch": ids, "leader": optionalIds},
    "index-changed": {"epoch": ids, "incarnation": texts, "seq": ids},
    "index-since": {"incarnation": optionalTexts, "since": ids},
    "index-delta": {
        "incarnation": texts,
        "seq": ids,
        "full": bools,
        "entries": entryLists,
        "removed": st.lists(texts, max_size=5),
        "last": bools,
    },
    "status": {"watch": bools},
    "state": {"status": jsonObjects},
    "ls": {},
    "listing": {"files": st.lists(jsonObjects, max_size=4), "last": st.booleans()},
    "redirect": {"leader": ids, "address": texts},
    "get": {"name": texts, "offset": ids, "sha256": st.none() | sha256s},
    "file": {
        "name": texts,
        "size": ids,
        "sha256": sha256s,
        "offset": ids,
        "holder": ids,
        "leader": ids,
    },
    "fetch": {"name": texts, "overwrite": bools},
    "progress": {"name": texts, "bytes": ids, "size": ids},
    "fetched": {"name": texts, "size": ids, "sha256": sha256s, "already": bools},
    "lookup": {"name": texts},
    "found": {"name": texts, "size": ids, "sha256": sha256s, "holders": st.lists(finiteJSON, max_size=4)},
}


def messagesOf(type_: str) -> st.SearchStrategy:
    return st.fixed_dictionaries(FIELDS[type_]).map(lambda fields: Message(type_, **fields))


validMessages = st.sampled_from(sorted(FIELDS)).flatmap(messagesOf)

# Hostile values: wrong types, negatives, non-finite and oversized numbers,
# deep nesting, texts with lone surrogates (legal as JSON escapes).
hugeInts = st.integers(min_value=10**300, max_value=10**330)
surrogates = st.characters(categories=["Cs"])
nastyTexts = st.text() | st.tuples(st.text(), surrogates, st.text()).map("".join)
nastyScalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | hugeInts
    | st.floats()
    | nastyTexts
    | st.sampled_from(["", SHA, SHA.upper(), "node", "control", "version"])
)
nastyJSON = st.recursive(
    nastyScalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
@st.composite
def nastyEntries(draw: st.DrawFn) -> list:
    """
    Lists of file entry objects whose fields are usually plausible (the
    right type, though perhaps non-finite or huge), sometimes hostile and
    sometimes missing, so that every check in L{FileEntry.fromDict} is reached.
    """
    plausible = {
        "name": nastyTexts,
        "size": ids,
        "mtime": st.floats() | hugeInts,
        "sha256": sha256s,
    }
    entries = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        entry = {}
        for field, strategy in plausible.items():
            mode = draw(st.sampled_from(["plausible", "plausible", "plausible", "hostile", "missing"]))
            if mode == "plausible":
                entry[field] = draw(strategy)
            elif mode == "hostile":
                entry[field] = draw(nastyJSON)
        entries.append(entry)
    return entries


def plausibleJSON(type_: str, field: str) -> st.SearchStrategy:
    """
    The JSON form of a plausible value of a field: the valid values, except
    that texts may hold lone surrogates and file entries may be broken.
    """
    strategy = FIELDS[type_][field]
    if strategy is texts:
        return nastyTexts
    if strategy is optionalTexts:
        return st.none() | nastyTexts
    if strategy is entryLists:
        return nastyEntries()
    if strategy is members:
        return members.map(lambda ms: [{"id": i, "address": a} for (i, a) in ms])
    return strategy


@st.composite
def nastyBodies(draw: st.DrawFn) -> object:
    """
    JSON values shaped like control messages: usually an object with a known
    type whose fields are each plausible, hostile or missing.
    """
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        return draw(nastyJSON)
    type_ = draw(st.sampled_from(sorted(FIELDS)))
    body = {"type": type_}
    for field in FIELDS[type_]:
        mode = draw(st.sampled_from(["plausible", "plausible", "plausible", "hostile", "missing"]))
        if mode == "plausible":
            body[field] = draw(plausibleJSON(type_, field))
        elif mode == "hostile":
            body[field] = draw(nastyJSON)
    return body


class RoundTripTests(SynchronousTestCase):
    """
    Every valid message survives C{encode} then C{decode} unchanged.
    """

    def test_fieldStrategiesMatchSchemas(self) -> None:
        """
        The generators used by these tests cover exactly the message types and
        fields of L{SCHEMAS}, so a schema change cannot leave a message type
        untested.
        """
        self.assertEqual(
            {t: sorted(fields) for t, fields in FIELDS.items()},
            {t: sorted(fields) for t, fields in SCHEMAS.items()},
        )

    @PROPERTY
    @given(validMessages)
    def test_roundTrip(self, message: Message) -> None:
        """
        C{decode(encode(m)) == m} for every message type, with any Unicode in
        strings (newlines, NUL, quotes, astral characters), large ids, null
        optional ids, file entries and nested JSON objects.
        """
        encoded = encode(message)
        self.assertEqual(encoded[:1], CONTROL)
        self.assertEqual(decode(encoded), message)

    def test_everyTypeRoundTrips(self) -> None:
        """
        One hand-written example of each message type round-trips: the
        property above draws types at random, this pins that none is missed.
        """
        self.assertEqual(sorted(EXAMPLES), sorted(SCHEMAS))
        for type_, fields in EXAMPLES.items():
            message = Message(type_, **fields)
            self.assertEqual(decode(encode(message)), message, type_)

    def test_membersWireForm(self) -> None:
        """
        Heartbeat members are sent as C{{"id", "address"}} objects and decode
        to C{(id, address)} tuples.
        """
        message = Message("heartbeat", node=1, epoch=2, leader=None, members=[(1, "h:1"), (3, "h:3")])
        body = json.loads(encode(message)[1:].decode("utf-8"))
        self.assertEqual(body["members"], [{"id": 1, "address": "h:1"}, {"id": 3, "address": "h:3"}])
        self.assertEqual(decode(encode(message)).members, [(1, "h:1"), (3, "h:3")])

    def test_unknownFieldsIgnored(self) -> None:
        """
        Fields a message type does not define are dropped, so a newer peer can
        add fields without breaking an older one.
        """
        message = decode(frame({"type": "status", "watch": True, "colour": "blue"}))
        self.assertEqual(message, Message("status", watch=True))

    def test_attributes(self) -> None:
        """
        Fields read as attributes; a field the message lacks is an
        L{AttributeError}, not a L{KeyError}.
        """
        message = decode(frame({"type": "stale", "epoch": 4, "leader": None}))
        self.assertEqual((message.type, message.epoch, message.leader), ("stale", 4, None))
        self.assertRaises(AttributeError, getattr, message, "request")

    def test_integerMtimeBecomesFloat(self) -> None:
        """
        A file entry whose mtime is a JSON integer decodes to a float, so
        entries compare and hash the same whatever form the sender used.
        """
        (entry,) = decode(indexDelta(entryDict(mtime=7))).entries
        self.assertIsInstance(entry.mtime, float)
        self.assertEqual(entry, FileEntry("a.txt", 3, 7.0, SHA))


class DecodeRobustnessTests(SynchronousTestCase):
    """
    C{decode} returns a L{Message} or raises L{WireError}, whatever it is
    given.
    """

    def assertMessageOrWireError(self, data: bytes) -> None:
        try:
            result = decode(data)
        except WireError as e:
            self.assertTrue(str(e))
            self.assertNotIn("\n", str(e))
        else:
            self.assertIsInstance(result, Message)
            self.assertIn(result.type, SCHEMAS)

    @PROPERTY
    @given(st.binary(max_size=200))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Arbitrary bytes decode to a message or raise L{WireError}, never any
        other exception.
        """
        self.assertMessageOrWireError(data)

    @PROPERTY
    @given(st.binary(max_size=200))
    def test_arbitraryControlPayload(self, data: bytes) -> None:
        """
        A control type byte followed by arbitrary bytes decodes to a message
        or raises L{WireError}.
        """
        self.assertMessageOrWireError(CONTROL + data)

    @PROPERTY
    @given(nastyBodies())
    def test_arbitraryJSON(self, body: object) -> None:
        """
        A control frame holding any JSON value - typically a known message
        type with some fields valid, some missing and some of the wrong type,
        negative, non-finite, huge or deeply nested - decodes to a message or
        raises L{WireError}.
        """
        self.assertMessageOrWireError(frame(body))

    @PROPERTY
    @given(nastyEntries())
    def test_arbitraryFileEntries(self, entries: list) -> None:
        """
        An index delta whose file entries are broken in any way (missing,
        mistyped, negative, non-finite or huge fields) decodes or raises
        L{WireError}.
        """
        self.assertMessageOrWireError(indexDelta(*entries))

    @PROPERTY
    @given(nastyBodies())
    def test_decodedMessagesReencode(self, body: object) -> None:
        """
        Whatever C{decode} accepts, C{encode} can send on unchanged: a node
        relays names and entries it received, and must not fail to encode
        them.
        """
        try:
            message = decode(frame(body))
        except WireError:
            return
        encoded = encode(message)
        self.assertEqual(encode(decode(encoded)), encoded)

    def test_loneSurrogateName(self) -> None:
        """
        A name holding a lone surrogate (a legal C{\\udXXX} JSON escape) is
        either refused by C{decode} or survives re-encoding: a node that
        accepted it must be able to relay it (index deltas, listings) without
        C{encode} raising C{UnicodeEncodeError}.
        """
        data = b'C{"type":"fetch","name":"a\\ud800b","overwrite":false}'
        try:
            message = decode(data)
        except WireError:
            return
        self.assertEqual(decode(encode(message)), message)

    def test_deepNesting(self) -> None:
        """
        Deeply nested JSON (which exhausts the parser's recursion) is a
        L{WireError}.
        """
        self.assertRaises(WireError, decode, CONTROL + b"[" * 100000 + b"]" * 100000)
        self.assertRaises(
            WireError, decode, CONTROL + b'{"type":"state","status":' + b'{"a":' * 100000 + b"1" + b"}" * 100001
        )

    def test_hugeInteger(self) -> None:
        """
        An integer too long for Python's int parsing limit is a L{WireError}.
        """
        data = CONTROL + b'{"type":"stale","epoch":' + b"9" * 5000 + b',"leader":null}'
        self.assertRaises(WireError, decode, data)

    def test_httpRequest(self) -> None:
        """
        An HTTP request (someone pointing a browser at a node) is a
        L{WireError}.
        """
        self.assertRaises(WireError, decode, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


class DecodeRejectsTests(SynchronousTestCase):
    """
    Specific malformed frames that C{decode} refuses with L{WireError}.
    """

    def assertRejected(self, data: bytes, reasonPart: str = "") -> WireError:
        error = self.assertRaises(WireError, decode, data)
        self.assertIn(reasonPart, str(error))
        return error

    def test_emptyFrame(self) -> None:
        """
        An empty frame is refused.
        """
        self.assertRejected(b"", "empty")

    def test_unknownFrameType(self) -> None:
        """
        A frame whose type byte is not C{C} is refused even if its payload
        is a valid message, so future binary frames cannot be misread.
        """
        valid = encode(Message("status", watch=True))
        self.assertRejected(b"X" + valid[1:], "unknown frame type")
        self.assertRejected(b"c" + valid[1:], "unknown frame type")
        self.assertRejected(b"\x00" + valid[1:], "unknown frame type")

    def test_invalidUTF8(self) -> None:
        """
        A payload that is not UTF-8 is refused.
        """
        self.assertRejected(b'C{"type":"fetch","name":"\xff\xfe","overwrite":false}', "invalid JSON")

    def test_invalidJSON(self) -> None:
        """
        A payload that is not JSON (truncated, trailing garbage, bare words)
        is refused.
        """
        for data in (b'C{"type":', b"C", b'C{"type":"ls"} x', b"Cls", b"C{'type':'ls'}"):
            self.assertRejected(data, "invalid JSON")

    def test_nonObjectJSON(self) -> None:
        """
        JSON that is not an object (a list, string, number, null) is refused.
        """
        for data in (b'C["ls"]', b'C"ls"', b"C1", b"Cnull", b"Ctrue"):
            self.assertRejected(data, "not a JSON object")

    def test_missingOrBadType(self) -> None:
        """
        An object without a string C{type} is refused.
        """
        for body in ({}, {"type": 1}, {"type": None}, {"type": ["ls"]}):
            self.assertRejected(frame(body), "no type")

    def test_unknownType(self) -> None:
        """
        A message type outside L{SCHEMAS} is refused.
        """
        self.assertRejected(frame({"type": "shutdown"}), "unknown message type")

    def test_missingField(self) -> None:
        """
        Every schema field is required, including optional ones (which must
        be sent as null).
        """
        self.assertRejected(frame({"type": "stale", "epoch": 1}), "lacks field 'leader'")
        self.assertRejected(frame({"type": "get", "name": "a", "offset": 0}), "lacks field 'sha256'")

    def test_helloFingerprint(self) -> None:
        """
        A hello's fingerprint is null or C{sha256:} and exactly 64 lowercase
        hex digits; anything else (upper case, another hash, a short digest,
        a number) is refused, and the hello has no proof field any more.
        """
        base = dict(EXAMPLES["hello"], type="hello")
        self.assertEqual(decode(frame(dict(base, fingerprint=None))).fingerprint, None)
        good = "sha256:" + "0a" * 32
        self.assertEqual(decode(frame(dict(base, fingerprint=good))).fingerprint, good)
        for bad in ("sha256:" + "0A" * 32, "sha1:" + "0a" * 20, "sha256:" + "0a" * 31, "0a" * 32, 5, True):
            self.assertRejected(frame(dict(base, fingerprint=bad)), "'fingerprint'")
        self.assertRejected(frame({k: v for k, v in base.items() if k != "fingerprint"}), "lacks field 'fingerprint'")
        self.assertNotIn("proof", SCHEMAS["hello"])

    def test_boolIsNotInt(self) -> None:
        """
        C{true} is refused where an integer is expected, even though Python's
        C{bool} is an C{int}.
        """
        self.assertRejected(frame({"type": "stale", "epoch": True, "leader": None}), "'epoch'")
        self.assertRejected(frame({"type": "stale", "epoch": 1, "leader": False}), "'leader'")
        self.assertRejected(indexDelta(entryDict(size=True)), "'size'")
        self.assertRejected(indexDelta(entryDict(mtime=True)), "'mtime'")

    def test_wrongFieldTypes(self) -> None:
        """
        Strings, floats, lists and objects are refused where another type is
        expected.
        """
        for body in (
            {"type": "stale", "epoch": "1", "leader": None},
            {"type": "stale", "epoch": 1.0, "leader": None},
            {"type": "status", "watch": 1},
            {"type": "status", "watch": "true"},
            {"type": "fetch", "name": 5, "overwrite": False},
            {"type": "fetch", "name": None, "overwrite": False},
            {"type": "state", "status": []},
            {"type": "listing", "files": {}, "last": True},
            dict(json.loads(indexDelta()[1:]), entries={}),
            dict(json.loads(indexDelta()[1:]), removed=[1]),
            dict(json.loads(indexDelta()[1:]), full=0),
            dict(json.loads(indexDelta()[1:]), incarnation=None),
            {"type": "index-since", "incarnation": 5, "since": 0},
            {"type": "index-since", "incarnation": None, "since": "0"},
            {"type": "index-changed", "epoch": 1, "incarnation": None, "seq": 1},
            {"type": "index-changed", "epoch": 1, "incarnation": INCARNATION, "seq": 1.5},
            {"type": "heartbeat", "node": 1, "epoch": 1, "leader": None, "members": [[1, "h"]]},
            {"type": "heartbeat", "node": 1, "epoch": 1, "leader": None, "members": [{"id": 1}]},
            {"type": "hello", "version": 1, "role": "node", "node": 1, "nonce": "n",
             "address": 5, "purpose": "control", "fingerprint": None},
        ):
            self.assertRejected(frame(body))

    def test_negativeIds(self) -> None:
        """
        Negative ids, epochs, offsets and sizes are refused, including
        optional ids and member ids.
        """
        for body in (
            {"type": "stale", "epoch": -1, "leader": None},
            {"type": "stale", "epoch": 1, "leader": -1},
            {"type": "get", "name": "a", "offset": -1, "sha256": None},
            {"type": "heartbeat", "node": -1, "epoch": 1, "leader": None, "members": []},
            {"type": "heartbeat", "node": 1, "epoch": 1, "leader": None,
             "members": [{"id": -2, "address": "h"}]},
            {"type": "ready", "node": -5},
            {"type": "index-changed", "epoch": 1, "incarnation": INCARNATION, "seq": -1},
            {"type": "index-since", "incarnation": None, "since": -1},
            dict(json.loads(indexDelta()[1:]), seq=-1),
        ):
            self.assertRejected(frame(body), "negative")

    def test_nonFiniteMtime(self) -> None:
        """
        A file entry whose mtime is NaN, Infinity or -Infinity (which Python's
        JSON parser accepts) or a float literal that overflows to infinity is
        refused.
        """
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
            data = indexDelta(entryDict(mtime=0)).replace(b'"mtime": 0', b'"mtime": ' + literal)
            self.assertIn(literal, data)
            self.assertRejected(data)

    def test_hugeIntegerMtime(self) -> None:
        """
        A file entry whose mtime is an integer too large for a float is
        refused with L{WireError} (not an C{OverflowError} escaping
        C{decode}).
        """
        self.assertRejected(indexDelta(entryDict(mtime=10**400)))

    def test_nonFiniteNumbersAnywhere(self) -> None:
        """
        NaN and Infinity are not JSON: they are refused wherever they appear,
        not just in file entries, so every decoded message can be sent to a
        strict JSON peer and compares equal to itself.
        """
        for literal in (b"NaN", b"Infinity", b"-Infinity"):
            self.assertRejected(b'C{"type":"state","status":{"load":' + literal + b"}}")
            self.assertRejected(b'C{"type":"listing","files":[{"size":' + literal + b"}]}")


class FileEntryTests(SynchronousTestCase):
    """
    Tests for L{FileEntry.fromDict}.
    """

    def test_valid(self) -> None:
        """
        A well-formed entry builds an equal L{FileEntry}, which converts back
        to the same dict.
        """
        entry = FileEntry.fromDict(entryDict())
        self.assertEqual(entry, FileEntry("a.txt", 3, 1.5, SHA))
        self.assertEqual(entry.toDict(), entryDict())
        self.assertEqual(hash(entry), hash(FileEntry("a.txt", 3, 1.5, SHA)))

    def test_badSha256(self) -> None:
        """
        The sha256 must be exactly 64 lower-case hex digits.
        """
        for bad in (SHA[:-1], SHA + "0", SHA.upper(), "g" * 64, "", " " * 64, 5, None):
            self.assertRaises(WireError, FileEntry.fromDict, entryDict(sha256=bad))

    def test_negativeSize(self) -> None:
        """
        A negative size is refused.
        """
        error = self.assertRaises(WireError, FileEntry.fromDict, entryDict(size=-1))
        self.assertIn("negative", str(error))

    def test_hugeSize(self) -> None:
        """
        A size of 2**63 or more is refused (10**400 included); 2**63 - 1 is
        the largest accepted.
        """
        for bad in (MAX_FILE_SIZE + 1, 2**64, 10**400):
            error = self.assertRaises(WireError, FileEntry.fromDict, entryDict(size=bad))
            self.assertIn("2**63", str(error))
        self.assertEqual(FileEntry.fromDict(entryDict(size=MAX_FILE_SIZE)).size, MAX_FILE_SIZE)

    def test_nonFiniteMtime(self) -> None:
        """
        An mtime that is not a finite number (infinite, or an integer too
        large for a float) is refused.
        """
        for bad in (float("inf"), float("-inf"), float("nan"), 10**400):
            self.assertRaises(WireError, FileEntry.fromDict, entryDict(mtime=bad))

    def test_missingAndWrongFields(self) -> None:
        """
        Missing fields, wrong types and non-objects are refused.
        """
        for field in ("name", "size", "mtime", "sha256"):
            value = entryDict()
            del value[field]
            self.assertRaises(WireError, FileEntry.fromDict, value)
        for bad in (entryDict(name=1), entryDict(size=1.0), entryDict(mtime="1"), [], "a", None):
            self.assertRaises(WireError, FileEntry.fromDict, bad)


class EncodeTests(SynchronousTestCase):
    """
    C{encode} refuses messages that do not fit their schema, at the sender.
    """

    def test_missingField(self) -> None:
        """
        A message lacking a schema field is a L{WireError} naming the field.
        """
        error = self.assertRaises(WireError, encode, Message("stale", epoch=1))
        self.assertIn("leader", str(error))

    def test_unknownType(self) -> None:
        """
        A message of an unknown type is a L{WireError}.
        """
        self.assertRaises(WireError, encode, Message("shutdown"))

    def test_invalidValue(self) -> None:
        """
        A field of the wrong type or out of range is a L{WireError} at the
        sender, so the bug does not show as a dropped connection elsewhere.
        """
        self.assertRaises(WireError, encode, Message("stale", epoch=-1, leader=None))
        self.assertRaises(WireError, encode, Message("status", watch=1))
        self.assertRaises(
            WireError,
            encode,
            deltaMessage([FileEntry("a", 1, math.nan, SHA)], []),
        )

    def test_asciiOnly(self) -> None:
        """
        Frames are ASCII JSON: non-ASCII text travels as C{\\u} escapes, so
        any string a peer could send (even a lone surrogate it wrote as an
        escape) encodes without error, and there is no padding.
        """
        encoded = encode(Message("fetch", name="caf\u00e9", overwrite=False))
        self.assertEqual(encoded, b'C{"type":"fetch","name":"caf\\u00e9","overwrite":false}')
        lone = encode(Message("fetch", name="a\ud800b", overwrite=False))
        self.assertEqual(decode(lone).name, "a\ud800b")

    def test_versionConstant(self) -> None:
        """
        This end speaks protocol version 2 (TLS, proofs bound to the channel
        and both hellos), the version the handshake tests and peers assume.
        """
        self.assertEqual(PROTOCOL_VERSION, 2)


class ChunkedTests(SynchronousTestCase):
    """
    Tests for L{chunked} and the size of a full C{index-delta} frame.
    """

    def test_empty(self) -> None:
        """
        No entries is one empty piece, so an empty index is still sent (as
        one empty, last frame).
        """
        self.assertEqual(chunked([]), [[]])

    def test_splits(self) -> None:
        """
        Entries are split in order into lists of at most C{size}, every one
        full except the last.
        """
        entries = [FileEntry(f"f{i}", i, 0.0, SHA) for i in range(7)]
        self.assertEqual(chunked(entries, 3), [entries[0:3], entries[3:6], entries[6:7]])
        self.assertEqual(chunked(entries, 7), [entries])
        self.assertEqual(chunked(entries, 100), [entries])

    def test_defaultSize(self) -> None:
        """
        The default chunk size is L{ENTRIES_PER_FRAME}.
        """
        entries = [FileEntry(f"f{i}", i, 0.0, SHA) for i in range(2 * ENTRIES_PER_FRAME + 1)]
        parts = chunked(entries)
        self.assertEqual([len(p) for p in parts], [ENTRIES_PER_FRAME, ENTRIES_PER_FRAME, 1])
        self.assertEqual([e for p in parts for e in p], entries)

    def assertChunkFits(self, name: str) -> None:
        self.assertLessEqual(len(name.encode("utf-8")), 255)
        entries = [
            FileEntry(name, 2**63 - 1, -1.2345678901234567e-300, SHA) for _ in range(ENTRIES_PER_FRAME)
        ]
        self.assertLess(len(encode(chunkMessage(entries))), MAX_FRAME)

    def test_fullChunkFits(self) -> None:
        """
        A full C{index-delta} frame of L{ENTRIES_PER_FRAME} entries with 255-byte names
        (ASCII, or 2- and 3-byte UTF-8 characters), huge sizes and long mtimes
        is smaller than L{MAX_FRAME}.
        """
        self.assertChunkFits("a" * 255)
        self.assertChunkFits("\u00e9" * 127)
        self.assertChunkFits("\u20ac" * 85)

    def test_fullChunkOfQuotedNamesFits(self) -> None:
        """
        The same holds for legal 255-byte names made of characters JSON must
        escape: C{"} doubles in size, control characters grow sixfold as
        C{\\u00XX}.  Such a frame must not exceed L{MAX_FRAME}, or the
        receiver drops the connection and the index never transfers.
        """
        self.assertChunkFits('"' * 255)
        self.assertChunkFits("\x01" * 255)


class FrameLimitTests(SynchronousTestCase):
    """
    C{encode} refuses any frame the receiver would drop for its length.
    """

    def fetchOfSize(self, size: int) -> Message:
        """
        A C{fetch} message whose frame is exactly C{size} bytes long.
        """
        empty = len(encode(Message("fetch", name="", overwrite=False)))
        return Message("fetch", name="a" * (size - empty), overwrite=False)

    def test_limitIsTheProtocols(self) -> None:
        """
        The sender's limit is the receiver's: L{MAX_FRAME} is 1 MiB and
        equals the protocol's C{MAX_LENGTH}, so a frame C{encode} accepts
        is never dropped for its length.
        """
        self.assertEqual(MAX_FRAME, 1 << 20)
        self.assertEqual(P2PProtocol.MAX_LENGTH, MAX_FRAME)

    def test_atTheLimit(self) -> None:
        """
        A frame of exactly L{MAX_FRAME} bytes is sent (the receiver drops
        only longer ones); one byte more is a L{WireError} naming the size
        and the limit.
        """
        self.assertEqual(len(encode(self.fetchOfSize(MAX_FRAME))), MAX_FRAME)
        error = self.assertRaises(WireError, encode, self.fetchOfSize(MAX_FRAME + 1))
        self.assertIn(str(MAX_FRAME + 1), str(error))
        self.assertIn(str(MAX_FRAME), str(error))

    def test_escapesCount(self) -> None:
        """
        The limit applies to the encoded bytes, not to the characters: a
        name of a sixth of L{MAX_FRAME} control characters, each sent as
        C{\\\\u00XX}, is refused.
        """
        self.assertRaises(WireError, encode, Message("fetch", name="\x01" * (MAX_FRAME // 6 + 1), overwrite=False))

    def test_oldOverlongUpdate(self) -> None:
        """
        One C{index-delta} frame holding 500 changed entries and 500 removed
        names, all 255 bytes of characters JSON escapes as C{\\\\uXXXX} (the
        update a node once sent whole), is about 1.6 MB: C{encode} refuses
        it at the sender instead of the receiver dropping the link.
        """
        error = self.assertRaises(WireError, encode, updateMessage(escapedUpdate()))
        self.assertIn("frame limit", str(error))
        size = int(re.search(r"index-delta message is (\d+) bytes", str(error)).group(1))
        self.assertGreater(size, 1_500_000)


def escapedName(i: int) -> str:
    """
    A distinct 255-byte name whose characters JSON escapes as C{\\\\u0001}:
    the longest encoding a legal name can have.
    """
    name = "\x01" * 251 + f"{i:04d}"
    assert len(name.encode("utf-8")) == 255
    return name


def escapedUpdate() -> tuple:
    """
    The changed entries and removed names of the old over-long update.
    """
    changed = [FileEntry(escapedName(i), 2**63 - 1, -1.2345678901234567e-300, SHA) for i in range(500)]
    removed = [escapedName(500 + i) for i in range(500)]
    return changed, removed


# Names as a node may list them: any Unicode scalar value, with a bias to
# those JSON escapes (control characters, quotes, backslashes, U+2028, astral
# characters as surrogate pairs), cut to at most 255 UTF-8 bytes.
escapedCharacters = st.sampled_from(["\x01", "\x1f", '"', "\\", "\u2028", "\u00e9", "\U0001f600", "\U0010ffff"])
nameCharacters = st.characters(codec="utf-8") | escapedCharacters


def cutToBytes(text: str, limit: int = 255) -> str:
    """
    The longest prefix of C{text} of at most C{limit} UTF-8 bytes.
    """
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


wireNames = st.text(nameCharacters, max_size=255).map(cutToBytes) | nameCharacters.map(
    lambda c: cutToBytes(c * 255)
)
wireEntries = st.builds(
    FileEntry,
    name=wireNames,
    size=fileSizes,
    mtime=st.floats(allow_nan=False, allow_infinity=False),
    sha256=sha256s,
)
listingRows = st.fixed_dictionaries(
    {"name": wireNames, "size": ids, "sha256": sha256s, "holders": st.lists(ids, max_size=40)}
)
# Budgets from smaller than one item up to a few dozen items, so that pieces
# split by bytes, by count, and around items too big for any piece.
budgets = st.integers(min_value=0, max_value=20000)
counts = st.integers(min_value=1, max_value=12)

# Every id at its 64-bit largest, so the envelope is as long as it gets.
BIG = 2**64


def deltaMessage(entries: list, removed: list, full: bool = False) -> Message:
    """
    An C{index-delta} frame of C{entries} and C{removed} names, its
    envelope as long as a node's gets.
    """
    return Message(
        "index-delta", incarnation=INCARNATION, seq=BIG, full=full, entries=entries, removed=removed, last=False
    )


def chunkMessage(entries: list) -> Message:
    """
    A frame of a whole file list: a full C{index-delta}.
    """
    return deltaMessage(entries, [], full=True)


def updateMessage(piece: tuple) -> Message:
    """
    A frame of changes: an C{index-delta} with changed entries and removed
    names.
    """
    entries, removed = piece
    return deltaMessage(entries, removed)


def listingMessage(files: list) -> Message:
    return Message("listing", files=files, last=False)


def itemBytes(message: Message, empty: Message) -> int:
    """
    What a splitter charges for the items of C{message}, measured on the
    encoded frame: its length beyond the same message with empty lists, plus
    one comma per item (the JSON has one fewer per non-empty list).
    """
    lists = [value for value in message.fields.values() if isinstance(value, list)]
    items = sum(len(value) for value in lists)
    commas = items - sum(1 for value in lists if value)
    return len(encode(message)) - len(encode(empty)) + items - commas


class SplitTests(SynchronousTestCase):
    """
    L{splitEntries}, L{splitUpdate} and L{splitListing} cut long lists into
    pieces whose frames fit L{MAX_FRAME}.
    """

    def assertPacked(self, pieces: list, message, empty: Message, budget: int, count: int, grow) -> None:
        """
        Every piece fits C{budget} bytes (measured on the encoded frame) and
        C{count} items, unless it is one item too big for any piece; and
        every piece but the last is full: the next piece's first item would
        not have fitted in it.
        """
        for i, piece in enumerate(pieces):
            built = message(piece)
            size = itemBytes(built, empty)
            items = sum(len(value) for value in built.fields.values() if isinstance(value, list))
            self.assertLessEqual(items, count)
            if items > 1:
                self.assertLessEqual(size, budget)
            if i + 1 < len(pieces):
                self.assertGreater(items, 0)
                bigger = message(grow(piece, pieces[i + 1]))
                self.assertTrue(items == count or itemBytes(bigger, empty) > budget)

    @PROPERTY
    @given(st.lists(wireEntries, max_size=30), budgets, counts)
    def test_entriesPacked(self, entries: list, budget: int, count: int) -> None:
        """
        C{splitEntries} keeps the entries in order, packs each piece to its
        byte budget and count and no further, and returns at least one
        (possibly empty) piece.
        """
        pieces = splitEntries(entries, budget=budget, count=count)
        self.assertGreaterEqual(len(pieces), 1)
        self.assertEqual([e for piece in pieces for e in piece], entries)
        self.assertPacked(
            pieces, chunkMessage, chunkMessage([]), budget, count, lambda piece, next: piece + next[:1]
        )

    @PROPERTY
    @given(st.lists(listingRows, max_size=20), budgets, counts)
    def test_listingPacked(self, files: list, budget: int, count: int) -> None:
        """
        C{splitListing} does the same for listing rows, sized with all their
        holders.
        """
        pieces = splitListing(files, budget=budget, count=count)
        self.assertGreaterEqual(len(pieces), 1)
        self.assertEqual([f for piece in pieces for f in piece], files)
        self.assertPacked(
            pieces, listingMessage, listingMessage([]), budget, count, lambda piece, next: piece + next[:1]
        )

    @PROPERTY
    @given(st.lists(wireEntries, max_size=20), st.lists(wireNames, max_size=20), budgets, counts)
    def test_updatePacked(self, changed: list, removed: list, budget: int, count: int) -> None:
        """
        C{splitUpdate} keeps changes and removals in order with every change
        before every removal (so applying the pieces in turn is applying the
        whole update), and packs changes and removals together into each
        piece's budget and count.
        """
        pieces = splitUpdate(changed, removed, budget=budget, count=count)
        self.assertGreaterEqual(len(pieces), 1)
        inTurn = [item for es, rs in pieces for item in [("changed", e) for e in es] + [("removed", r) for r in rs]]
        self.assertEqual(inTurn, [("changed", e) for e in changed] + [("removed", r) for r in removed])

        def grow(piece: tuple, next: tuple) -> tuple:
            (entries, names), (nextEntries, nextNames) = piece, next
            if nextEntries:
                return (entries + nextEntries[:1], names)
            return (entries, names + nextNames[:1])

        self.assertPacked(pieces, updateMessage, updateMessage(([], [])), budget, count, grow)

    @PROPERTY
    @given(st.lists(wireEntries, max_size=20), st.lists(wireNames, max_size=20), budgets, counts)
    def test_iterUpdateIsSplitUpdate(self, changed: list, removed: list, budget: int, count: int) -> None:
        """
        L{iterUpdate}, given the changes and removals as one-pass iterators,
        yields exactly the pieces of L{splitUpdate} for the same budget and
        count, one at a time: when a piece is yielded it has read at most
        one item past it (the one that did not fit), so a sender that takes
        one piece per frame spends one frame's work at a time.
        """
        taken: List[object] = []

        def reading(items: list) -> Iterator[object]:
            for item in items:
                taken.append(item)
                yield item

        pieces = []
        for piece in iterUpdate(reading(changed), reading(removed), budget=budget, count=count):
            pieces.append(piece)
            inPieces = sum(len(es) + len(rs) for es, rs in pieces)
            self.assertLessEqual(len(taken), inPieces + 1)
        self.assertEqual(pieces, splitUpdate(changed, removed, budget=budget, count=count))
        self.assertEqual(len(taken), len(changed) + len(removed))

    def test_iterUpdateIsLazy(self) -> None:
        """
        L{iterUpdate} over 100,000 changes yields its first two pieces of
        three having read seven of them: it never measures the whole before
        the first frame.  Nothing at all is still one empty piece.
        """
        read = []

        def changes() -> Iterator[FileEntry]:
            for i in range(100_000):
                read.append(i)
                yield FileEntry(f"f{i}", i, 1.5, SHA)

        pieces = iterUpdate(changes(), [], count=3)
        first, second = next(pieces), next(pieces)
        self.assertEqual(first, ([FileEntry(f"f{i}", i, 1.5, SHA) for i in range(3)], []))
        self.assertEqual(second, ([FileEntry(f"f{i}", i, 1.5, SHA) for i in range(3, 6)], []))
        self.assertEqual(len(read), 7)
        self.assertEqual(list(iterUpdate([], [])), [([], [])])

    @PROPERTY
    @given(st.lists(wireEntries, max_size=30), st.lists(wireNames, max_size=30), st.lists(listingRows, max_size=30))
    def test_defaultsFit(self, entries: list, removed: list, files: list) -> None:
        """
        With the default budget and count, every piece of any entries,
        removed names and listing rows encodes, at most L{MAX_FRAME} bytes
        long, and the pieces put together give back the inputs in order.
        """
        pieces = splitEntries(entries)
        self.assertEqual([e for piece in pieces for e in piece], entries)
        for piece in pieces:
            self.assertLessEqual(len(encode(chunkMessage(piece))), MAX_FRAME)
        updates = splitUpdate(entries, removed)
        self.assertEqual([e for piece, _ in updates for e in piece], entries)
        self.assertEqual([r for _, piece in updates for r in piece], removed)
        for piece in updates:
            self.assertLessEqual(len(encode(updateMessage(piece))), MAX_FRAME)
        rows = splitListing(files)
        self.assertEqual([f for piece in rows for f in piece], files)
        for piece in rows:
            self.assertLessEqual(len(encode(listingMessage(piece))), MAX_FRAME)

    def test_empty(self) -> None:
        """
        Nothing to send is still one empty piece, so an empty index goes as
        one (empty, last) frame and an empty listing as one reply.
        """
        self.assertEqual(splitEntries([]), [[]])
        self.assertEqual(splitListing([]), [[]])
        self.assertEqual(splitUpdate([], []), [([], [])])

    def test_envelopeRoom(self) -> None:
        """
        L{ENVELOPE_ROOM} holds the envelope of every split message type with
        64-bit numbers (an C{index-delta}'s change number, with its
        incarnation), and with L{ITEM_BUDGET} makes exactly L{MAX_FRAME}.
        """
        for empty in (chunkMessage([]), updateMessage(([], [])), listingMessage([])):
            self.assertLessEqual(len(encode(empty)), ENVELOPE_ROOM, empty.type)
        self.assertEqual(ITEM_BUDGET + ENVELOPE_ROOM, MAX_FRAME)

    def test_exactBudget(self) -> None:
        """
        An item costs its encoded bytes plus one for its comma, and a piece
        may use its whole budget: three items fit a budget of exactly three
        costs, and one byte less leaves room for two.
        """
        entry = FileEntry("caf\u00e9 \u2028", 12, 1.5, SHA)
        cost = len(encode(chunkMessage([entry]))) - len(encode(chunkMessage([]))) + 1
        entries = [entry] * 7
        self.assertEqual([len(p) for p in splitEntries(entries, budget=3 * cost)], [3, 3, 1])
        self.assertEqual([len(p) for p in splitEntries(entries, budget=3 * cost - 1)], [2, 2, 2, 1])
        pieces = splitUpdate(entries[:2], ["caf\u00e9"], budget=2 * cost + len('"caf\\u00e9",'))
        self.assertEqual(pieces, [(entries[:2], ["caf\u00e9"])])

    def test_oldOverlongUpdateSplits(self) -> None:
        """
        The old 1.6 MB update (500 changed entries and 500 removed names of
        255 escaped bytes each) splits, with L{splitUpdate} and with
        L{iterUpdate} alike, into pieces that all encode as C{index-delta}
        frames within L{MAX_FRAME}, with nothing lost or reordered; by
        bytes alone, with no count cap, it still needs two.
        """
        changed, removed = escapedUpdate()
        for count in (ENTRIES_PER_FRAME, 10**6):
            pieces = splitUpdate(changed, removed, count=count)
            self.assertEqual(list(iterUpdate(iter(changed), iter(removed), count=count)), pieces)
            self.assertEqual(len(pieces), 2)
            for piece in pieces:
                self.assertLessEqual(len(encode(updateMessage(piece))), MAX_FRAME)
            self.assertEqual([e for piece, _ in pieces for e in piece], changed)
            self.assertEqual([r for _, piece in pieces for r in piece], removed)

    def test_fullFrames(self) -> None:
        """
        Without a count cap, the default budget fills frames to within one
        item of L{MAX_FRAME} and never past it: the budget is neither too
        large (a frame over the limit) nor needlessly small.
        """
        entries = [FileEntry(escapedName(i), 2**63 - 1, 1.5, SHA) for i in range(1500)]
        largest = max(len(json.dumps(e.toDict(), separators=(",", ":"))) + 1 for e in entries)
        pieces = splitEntries(entries, count=10**6)
        self.assertEqual([e for piece in pieces for e in piece], entries)
        self.assertGreater(len(pieces), 1)
        for piece in pieces[:-1]:
            length = len(encode(chunkMessage(piece)))
            self.assertLessEqual(length, MAX_FRAME)
            self.assertGreater(length, MAX_FRAME - ENVELOPE_ROOM - largest)

    def test_manyHolders(self) -> None:
        """
        A listing row is sized with all its holders: rows of 40,000 holders
        (about 0.8 MB each) go one to a frame although there are fewer than
        L{ENTRIES_PER_FRAME} of them.
        """
        rows = [
            {"name": f"f{i}", "size": 1, "sha256": SHA, "holders": list(range(2**60, 2**60 + 40000))}
            for i in range(3)
        ]
        pieces = splitListing(rows)
        self.assertEqual(pieces, [[row] for row in rows])
        for piece in pieces:
            self.assertLessEqual(len(encode(listingMessage(piece))), MAX_FRAME)

    def test_itemTooBigAlone(self) -> None:
        """
        An item too big for any frame travels alone, so its neighbours still
        go, and C{encode} refuses that one piece.
        """
        huge = FileEntry("a" * MAX_FRAME, 1, 1.5, SHA)
        small = [FileEntry(f"f{i}", 1, 1.5, SHA) for i in range(4)]
        pieces = splitEntries(small[:2] + [huge] + small[2:])
        self.assertEqual(pieces, [small[:2], [huge], small[2:]])
        self.assertRaises(WireError, encode, chunkMessage(pieces[1]))
        encode(chunkMessage(pieces[0]))
        encode(chunkMessage(pieces[2]))

    def test_unencodableItem(self) -> None:
        """
        An item that cannot be encoded at all (a NaN mtime) is a
        L{WireError} at splitting, as it would be at encoding.
        """
        self.assertRaises(WireError, splitEntries, [FileEntry("a", 1, math.nan, SHA)])
        self.assertRaises(WireError, splitUpdate, [FileEntry("a", 1, math.nan, SHA)], [])
        self.assertRaises(WireError, next, iterUpdate([FileEntry("a", 1, math.nan, SHA)], []))

    def test_countAtLeastOne(self) -> None:
        """
        A count below one is a programming error, not an endless split.
        """
        self.assertRaises(ValueError, splitEntries, [FileEntry("a", 1, 1.5, SHA)], count=0)

    def test_chunkedIsSizeAware(self) -> None:
        """
        C{chunked} caps pieces at C{size} entries and at the byte budget:
        entries too big for C{size} of them to share a frame are split
        further, so its callers' frames fit too.
        """
        entries = [FileEntry("a" * 200000, 1, 1.5, SHA) for _ in range(12)]
        pieces = chunked(entries, 10)
        self.assertEqual([e for piece in pieces for e in piece], entries)
        self.assertEqual([len(p) for p in pieces], [5, 5, 2])
        for piece in pieces:
            self.assertLessEqual(len(encode(chunkMessage(piece))), MAX_FRAME)


class DeltaFramesTests(SynchronousTestCase):
    """
    Tests for L{deltaFrames}: the frames of one index answer, each entry's
    JSON made once, are exactly what L{encode} makes of L{iterUpdate}'s
    pieces, and each fits L{MAX_FRAME}.
    """

    def expected(self, incarnation, seq, full, changed, removed, budget=ITEM_BUDGET, count=ENTRIES_PER_FRAME):
        pieces = list(iterUpdate(changed, removed, budget, count))
        return [
            encode(
                Message(
                    "index-delta", incarnation=incarnation, seq=seq, full=full,
                    entries=entries, removed=names, last=i == len(pieces) - 1,
                )
            )
            for i, (entries, names) in enumerate(pieces)
        ]

    @PROPERTY
    @given(
        st.text(max_size=20), st.integers(0, 2**64), st.booleans(),
        st.lists(fileEntries, max_size=30), st.lists(nastyTexts, max_size=30),
        st.integers(1, 3000), st.integers(1, 12),
    )
    def test_sameAsEncode(self, incarnation, seq, full, changed, removed, budget, count) -> None:
        """
        For any entries (any names, lone surrogates included), removed
        names, budget and count, the frames are byte for byte those of
        L{encode}, the last one marked.
        """
        self.assertEqual(
            list(deltaFrames(incarnation, seq, full, changed, removed, budget, count)),
            self.expected(incarnation, seq, full, changed, removed, budget, count),
        )

    def test_empty(self) -> None:
        """
        An empty answer is one frame, marked last.
        """
        [frame] = deltaFrames("i", 0, True, [], [])
        self.assertEqual(decode(frame), Message("index-delta", incarnation="i", seq=0, full=True, entries=[], removed=[], last=True))

    def test_fitsTheFrame(self) -> None:
        """
        Entries whose names escape to the longest JSON fill frames up to the
        byte budget, never past L{MAX_FRAME}, and decode back.
        """
        name = "\u2028" * 85  # 255 bytes of UTF-8, 510 bytes escaped
        entries = [FileEntry(name + str(i), 1, 2.5, SHA) for i in range(5000)]
        frames = list(deltaFrames("0123456789abcdef", 9, True, entries, [name] * 3000))
        self.assertTrue(all(len(f) <= MAX_FRAME for f in frames))
        self.assertGreater(max(map(len, frames)), MAX_FRAME // 4)
        got = [decode(f) for f in frames]
        self.assertEqual([e for m in got for e in m.entries], entries)
        self.assertEqual(sum(len(m.removed) for m in got), 3000)
        self.assertEqual([m.last for m in got], [False] * (len(got) - 1) + [True])

    def test_refusesWhatTheReceiverRefuses(self) -> None:
        """
        An entry the receiver would refuse (a negative or huge size, an
        mtime that is not finite, a digest that is not 64 lowercase hex
        digits), a removed name that is not a string, an envelope of the
        wrong types, or an item alone over the frame, raise L{WireError}.
        """
        bad = [
            FileEntry("a", -1, 1.0, SHA), FileEntry("a", MAX_FILE_SIZE + 1, 1.0, SHA),
            FileEntry("a", 1, math.nan, SHA), FileEntry("a", 1, math.inf, SHA),
            FileEntry("a", 1, 1.0, SHA.upper()), FileEntry("a", 1, 1.0, SHA[:-1]),
            FileEntry("a", True, 1.0, SHA), FileEntry(3, 1, 1.0, SHA),
        ]
        for entry in bad:
            self.assertRaises(WireError, list, deltaFrames("i", 1, True, [entry], []))
        self.assertRaises(WireError, list, deltaFrames("i", 1, True, [], [3]))
        self.assertRaises(WireError, list, deltaFrames("i", -1, True, [], []))
        self.assertRaises(WireError, list, deltaFrames("i", 1, 1, [], []))
        self.assertRaises(WireError, list, deltaFrames("i", 1, True, [FileEntry("x" * MAX_FRAME, 1, 1.0, SHA)], []))

    @PROPERTY
    @given(nastyEntries())
    def test_acceptedEntriesAreWellFormed(self, entries: list) -> None:
        """
        Whatever entry L{FileEntry.fromDict} accepts (by its quick check of
        exact types or the long way) has a string name, an int size in
        range, a finite float mtime and 64 lowercase hex digits.
        """
        for value in entries:
            try:
                entry = FileEntry.fromDict(value)
            except WireError:
                continue
            self.assertIs(type(entry.name), str)
            self.assertIs(type(entry.size), int)
            self.assertTrue(0 <= entry.size <= MAX_FILE_SIZE)
            self.assertIs(type(entry.mtime), float)
            self.assertTrue(math.isfinite(entry.mtime))
            self.assertRegex(entry.sha256, "^[0-9a-f]{64}$")
