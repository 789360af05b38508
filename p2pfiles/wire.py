"""
The wire format of p2pfiles.

Every frame of the L{Int32StringReceiver} stream is one type byte followed by
a payload.  Control messages are small UTF-8 JSON objects carrying a C{type};
the codec checks each one against a schema so that the rest of the program
only ever sees well-typed L{Message} objects.  File bytes never travel as JSON:
after a C{file} header the sender switches the connection to raw mode for
exactly C{length} bytes (see L{p2pfiles.protocol}).

This module imports nothing else of the package.
"""

import itertools
import json
import math
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

PROTOCOL_VERSION = 2

# The one frame type in use: a JSON control message.  Other type bytes are
# refused so that a future version can add binary frames without ambiguity.
CONTROL = b"C"

# Largest frame payload (type byte + JSON) either end accepts: control
# messages only, file bytes go in raw mode, so 1 MiB is ample and bounds what
# a hostile peer makes us buffer.  The protocol's MAX_LENGTH is this value.
MAX_FRAME = 1 << 20

# Bytes of each frame kept for everything around the listed items: the type
# byte, the braces, the type name, the field names, the list brackets and the
# numbers and flags.  The largest such envelope, an index-delta's
#     C{"type":"index-delta","incarnation":"<16 hex>","seq":S,"full":false,
#       "entries":[],"removed":[],"last":false}
# is 116 bytes with the type byte plus the digits of S (135 in all for a
# 64-bit seq); 1 KiB leaves room for a longer incarnation and a few more
# fields.
ENVELOPE_ROOM = 1024

# Bytes of each frame left for the listed items.  The splitters charge an
# item its encoded JSON (as encode writes it) plus one byte for the comma
# that separates it from the next, and keep the total within this budget;
# with the envelope that is at most MAX_FRAME.
ITEM_BUDGET = MAX_FRAME - ENVELOPE_ROOM

# Most items (index entries, removed names, listing rows) in one frame, on top
# of the byte budget, which alone guarantees the fit.  Frames of ordinary
# names then stay at tens of KiB, so a heartbeat on the same control link
# does not wait behind a megabyte of index.
ENTRIES_PER_FRAME = 500

# Largest file size an entry may carry: a signed 64-bit count, what every
# file system and every reader (a C off_t, a float's integral range aside)
# can hold.  A bigger number is a hostile or broken peer, not a file.
MAX_FILE_SIZE = (1 << 63) - 1


class WireError(ValueError):
    """
    A frame could not be decoded into a valid message.  The string form is a
    one-line reason suitable for a log line.
    """


class FileEntry:
    """
    One shared file as a node describes it: its name, size, modification time
    and SHA-256 (hex).
    """

    __slots__ = ("name", "size", "mtime", "sha256")

    def __init__(self, name: str, size: int, mtime: float, sha256: str) -> None:
        self.name = name
        self.size = size
        self.mtime = mtime
        self.sha256 = sha256

    def toDict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "mtime": self.mtime,
            "sha256": self.sha256,
        }

    @classmethod
    def fromDict(cls, value: Any) -> "FileEntry":
        """
        Build an entry from its JSON form, raising L{WireError} if a field is
        missing or of the wrong type.
        """
        if type(value) is dict:
            # The usual case, as json.loads makes it: exact types, checked
            # at once; anything else goes the long way, which says what is
            # wrong.
            name, size, mtime, sha256 = value.get("name"), value.get("size"), value.get("mtime"), value.get("sha256")
            if (
                type(name) is str and type(size) is int and type(mtime) is float and type(sha256) is str
                and 0 <= size <= MAX_FILE_SIZE and mtime - mtime == 0.0
                and len(sha256) == 64 and not sha256.strip(_HEX)
            ):
                return cls(name, size, mtime, sha256)
        if not isinstance(value, dict):
            raise WireError("file entry is not an object")
        name = _check("name", value.get("name"), (str,))
        size = _check("size", value.get("size"), (int,))
        mtime = _check("mtime", value.get("mtime"), (int, float))
        sha256 = _check("sha256", value.get("sha256"), (str,))
        if size < 0:
            raise WireError("file entry has a negative size")
        if size > MAX_FILE_SIZE:
            raise WireError("file entry size is 2**63 or more")
        try:
            mtime = float(mtime)
        except OverflowError:
            raise WireError("file entry mtime is not a finite number") from None
        if not math.isfinite(mtime):
            raise WireError("file entry mtime is not a finite number")
        if not _isHexDigest(sha256):
            raise WireError("file entry sha256 is not 64 hex digits")
        return cls(name, size, mtime, sha256)

    def _key(self) -> Tuple[str, int, float, str]:
        return (self.name, self.size, self.mtime, self.sha256)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileEntry):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return "FileEntry(name={!r}, size={!r}, mtime={!r}, sha256={!r})".format(
            *self._key()
        )


_HEX = "0123456789abcdef"


def _isHexDigest(value: str) -> bool:
    # str.strip removes every leading and trailing hex digit: nothing is
    # left exactly when all of them are.
    return len(value) == 64 and not value.strip(_HEX)


def _check(field: str, value: Any, types: Tuple[type, ...]) -> Any:
    # bool is an int subclass: never accept it where a number is expected.
    if isinstance(value, bool) and bool not in types:
        raise WireError(f"field {field!r} has the wrong type")
    if not isinstance(value, types):
        raise WireError(f"field {field!r} has the wrong type")
    return value


# Field checkers: each takes the decoded JSON value and returns the Python
# value, or raises WireError.

Checker = Callable[[str, Any], Any]


def _typed(*types: type) -> Checker:
    return lambda field, value: _check(field, value, types)


def _nonNegative(field: str, value: Any) -> int:
    _check(field, value, (int,))
    if value < 0:
        raise WireError(f"field {field!r} is negative")
    return value


def _optionalId(field: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    return _nonNegative(field, value)


def _entries(field: str, value: Any) -> List[FileEntry]:
    _check(field, value, (list,))
    return [FileEntry.fromDict(item) for item in value]


def _strings(field: str, value: Any) -> List[str]:
    _check(field, value, (list,))
    for item in value:
        _check(field, item, (str,))
    return value


def _members(field: str, value: Any) -> List[Tuple[int, str]]:
    _check(field, value, (list,))
    result = []
    for item in value:
        if not isinstance(item, dict):
            raise WireError(f"field {field!r} holds a non-object")
        result.append(
            (_nonNegative("id", item.get("id")), _check("address", item.get("address"), (str,)))
        )
    return result


def _fingerprint(field: str, value: Any) -> str:
    # A certificate fingerprint: "sha256:" and 64 lowercase hex digits.
    _check(field, value, (str,))
    if not (value.startswith("sha256:") and _isHexDigest(value[7:])):
        raise WireError(f"field {field!r} is not a sha256: fingerprint")
    return value


def _optional(checker: Checker) -> Checker:
    return lambda field, value: None if value is None else checker(field, value)


_str = _typed(str)
_bool = _typed(bool)
_dict = _typed(dict)
_list = _typed(list)
_number = _typed(int, float)

# The schema of every control message: type -> {field: checker}.  Every field
# listed is required (optional ones accept null); unknown fields are ignored so
# that a newer peer can add fields without breaking an older one.
SCHEMAS: Dict[str, Dict[str, Checker]] = {
    # Handshake (see p2pfiles.auth), once TLS is up.  A hello's
    # fingerprint is that of the certificate its sender presented in TLS
    # (null for a client, which has none).
    "hello": {
        "version": _nonNegative,
        "role": _str,
        "node": _optionalId,
        "nonce": _str,
        "address": _optional(_str),
        "purpose": _str,
        "fingerprint": _optional(_fingerprint),
    },
    "auth": {"proof": _str},
    "ready": {"node": _optionalId},
    "error": {"code": _str, "reason": _str},
    # Election and membership, on control links between nodes.
    "heartbeat": {
        "node": _nonNegative,
        "epoch": _nonNegative,
        "leader": _optionalId,
        "members": _members,
    },
    "stale": {"epoch": _nonNegative, "leader": _optionalId},
    # The index.  On control links only a small notice: a member's files
    # changed (its incarnation and change number).  The files themselves
    # travel on request connections, with back-pressure, so that they never
    # delay a heartbeat.
    "index-changed": {"epoch": _nonNegative, "incarnation": _str, "seq": _nonNegative},
    # Requests from clients (and from nodes acting as clients).
    "status": {"watch": _bool},
    "state": {"status": _dict},
    "ls": {},
    "listing": {"files": _list, "last": _bool},
    "redirect": {"leader": _nonNegative, "address": _str},
    "get": {"name": _str, "offset": _nonNegative, "sha256": _optional(_str)},
    "file": {
        "name": _str,
        "size": _nonNegative,
        "sha256": _str,
        "offset": _nonNegative,
        "holder": _nonNegative,
        "leader": _nonNegative,
    },
    "lookup": {"name": _str},
    "found": {"name": _str, "size": _nonNegative, "sha256": _str, "holders": _list},
    "fetch": {"name": _str, "overwrite": _bool},
    # Sent every second while a node fetches, so that the client knows it
    # is still at work (and can time out a node that went quiet).
    "progress": {"name": _str, "bytes": _nonNegative, "size": _nonNegative},
    # Everything a node shares that changed since change number C{since} of
    # its C{incarnation} (all of it when the incarnation is not its own or
    # the change is too old): C{index-delta} frames, the last one marked.
    "index-since": {"incarnation": _optional(_str), "since": _nonNegative},
    "index-delta": {
        "incarnation": _str,
        "seq": _nonNegative,
        "full": _bool,
        "entries": _entries,
        "removed": _strings,
        "last": _bool,
    },
    "fetched": {"name": _str, "size": _nonNegative, "sha256": _str, "already": _bool},
}


class Message:
    """
    A decoded control message: its C{type} and its fields, already checked
    against L{SCHEMAS}.  Fields are read as attributes: C{message.epoch}.
    """

    __slots__ = ("type", "fields")

    def __init__(self, type: str, **fields: Any) -> None:
        self.type = type
        self.fields = fields

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.type == other.type and self.fields == other.fields

    def __repr__(self) -> str:
        return f"Message({self.type!r}, {self.fields!r})"


def _jsonDefault(value: Any) -> Any:
    if isinstance(value, FileEntry):
        return value.toDict()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _encodeMembers(members: Iterable[Tuple[int, str]]) -> List[Mapping[str, Any]]:
    return [{"id": i, "address": a} for (i, a) in members]


def _dumps(value: Any) -> str:
    # ASCII-only JSON: every string, even one holding a lone surrogate that
    # a peer sent as an escape, encodes without error.
    return json.dumps(value, default=_jsonDefault, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode(message: Message) -> bytes:
    """
    Encode a message as one frame payload (type byte + JSON).  Raises
    L{WireError} if the message does not fit its schema or the payload is
    longer than L{MAX_FRAME}, so that a bug shows at the sender rather than
    as a dropped connection at the receiver.  Lists that can grow without
    bound are cut to fit by L{splitEntries}, L{splitUpdate} and
    L{splitListing}.
    """
    schema = SCHEMAS.get(message.type)
    if schema is None:
        raise WireError(f"unknown message type {message.type!r}")
    body = {"type": message.type}
    for field in schema:
        if field not in message.fields:
            raise WireError(f"{message.type} message lacks field {field!r}")
        value = message.fields[field]
        if field == "members":
            value = _encodeMembers(value)
        body[field] = value
    try:
        data = _dumps(body)
    except (TypeError, ValueError) as e:
        raise WireError(f"cannot encode {message.type} message: {e}") from None
    encoded = CONTROL + data.encode("ascii")
    # The one place the frame limit is checked for sending: the receiver
    # drops a connection that sends anything longer.
    if len(encoded) > MAX_FRAME:
        raise WireError(
            f"{message.type} message is {len(encoded)} bytes, over the frame limit of {MAX_FRAME}"
        )
    # Check our own output against the schema (cheap for control messages).
    decode(encoded)
    return encoded


def _refuseConstant(name: str) -> None:
    # NaN and Infinity are not JSON; Python's parser accepts them by default.
    raise ValueError(f"{name} is not a number")


def decode(frame: bytes) -> Message:
    """
    Decode one frame payload.  Raises L{WireError} for anything that is not a
    well-formed message of a known type; never raises anything else.
    """
    if not frame:
        raise WireError("empty frame")
    kind, payload = frame[:1], frame[1:]
    if kind != CONTROL:
        raise WireError(f"unknown frame type {kind!r}")
    try:
        body = json.loads(payload.decode("utf-8"), parse_constant=_refuseConstant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"invalid JSON: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(body, dict):
        raise WireError("control frame is not a JSON object")
    type_ = body.get("type")
    if not isinstance(type_, str):
        raise WireError("control frame has no type")
    schema = SCHEMAS.get(type_)
    if schema is None:
        raise WireError(f"unknown message type {type_[:40]!r}")
    fields = {}
    for field, checker in schema.items():
        if field not in body:
            raise WireError(f"{type_} message lacks field {field!r}")
        fields[field] = checker(field, body[field])
    return Message(type_, **fields)


# Splitting long lists into frames.
#
# Each splitter packs items in order, greedily: a piece takes items while
# their cost (encoded JSON + 1 for the comma) stays within C{budget} and their
# number within C{count}, then a new piece starts.  A message built from a
# piece and an envelope of at most ENVELOPE_ROOM bytes therefore fits in
# MAX_FRAME.  An item that alone costs more than the budget (no valid entry
# or listing row comes near: a 255-byte name escapes to at most 1530 bytes)
# goes in a piece of its own, so the others still travel and encode refuses
# that one piece with a WireError.  Every splitter returns at least one
# piece, possibly empty, so that an empty index is still sent as one
# (empty, last) chunk.


def _cost(item: Any) -> int:
    """
    The bytes C{item} adds to a frame: its JSON as L{encode} writes it, plus
    a separating comma.  Raises L{WireError} if it cannot be encoded at all.
    """
    try:
        return len(_dumps(item)) + 1
    except (TypeError, ValueError) as e:
        raise WireError(f"cannot encode {type(item).__name__}: {e}") from None


def _pack(costs: Iterable[int], budget: int, count: int) -> List[int]:
    """
    Where the pieces start: the indexes at which a greedy packing of items of
    the given C{costs} into pieces of at most C{budget} bytes and C{count}
    items begins a new piece.  The first piece starts at 0.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    starts = [0]
    used = items = 0
    for i, cost in enumerate(costs):
        if items and (used + cost > budget or items == count):
            starts.append(i)
            used = items = 0
        used += cost
        items += 1
    return starts


def _split(items: Sequence[Any], budget: int, count: int) -> List[List[Any]]:
    items = list(items)
    starts = _pack((_cost(item) for item in items), budget, count)
    ends = starts[1:] + [len(items)]
    return [items[a:b] for a, b in zip(starts, ends)]


def splitEntries(
    entries: Sequence[FileEntry], budget: int = ITEM_BUDGET, count: int = ENTRIES_PER_FRAME
) -> List[List[FileEntry]]:
    """
    Split C{entries}, in order, into the C{entries} lists of consecutive
    C{index-delta} messages, each small enough that its frame fits
    L{MAX_FRAME}: at most C{budget} bytes of entries and at most C{count}
    entries per list.  Always at least one list, possibly empty.
    """
    return _split(entries, budget, count)


def splitListing(
    files: Sequence[Dict[str, Any]], budget: int = ITEM_BUDGET, count: int = ENTRIES_PER_FRAME
) -> List[List[Dict[str, Any]]]:
    """
    Split listing rows (C{{"name", "size", "sha256", "holders"}} objects),
    in order, into the C{files} lists of consecutive C{listing} messages.
    A row is sized by its whole encoded JSON, so rows with many holders
    take their real room.  Always at least one list, possibly empty.
    """
    return _split(files, budget, count)


def splitUpdate(
    changed: Sequence[FileEntry],
    removed: Sequence[str],
    budget: int = ITEM_BUDGET,
    count: int = ENTRIES_PER_FRAME,
) -> List[Tuple[List[FileEntry], List[str]]]:
    """
    Split one index change into the C{(entries, removed)} pairs of
    consecutive C{index-delta} messages, each small enough that its frame
    fits L{MAX_FRAME}: changed entries and removed names share each piece's
    C{budget} bytes and C{count} items.

    Changed entries fill the pieces first and removed names follow, so every
    change comes before every removal, as in the single update: applying the
    pieces in order (each one's changes, then its removals) has the same
    effect as applying the whole update at once.  Always at least one pair,
    possibly C{([], [])}.
    """
    changed = list(changed)
    removed = list(removed)
    costs = [_cost(entry) for entry in changed] + [_cost(name) for name in removed]
    starts = _pack(costs, budget, count)
    ends = starts[1:] + [len(costs)]
    n = len(changed)
    return [
        (changed[min(a, n) : min(b, n)], removed[max(a - n, 0) : max(b - n, 0)])
        for a, b in zip(starts, ends)
    ]


def chunked(entries: Sequence[FileEntry], size: int = ENTRIES_PER_FRAME) -> List[List[FileEntry]]:
    """
    Split C{entries} into lists of at most C{size} that each fit in a frame
    (L{splitEntries} with a count of C{size}); always at least one list, so
    that an empty index is still sent as one (empty, last) chunk.
    """
    return splitEntries(entries, count=size)


def iterUpdate(
    changed: Iterable[FileEntry],
    removed: Iterable[str],
    budget: int = ITEM_BUDGET,
    count: int = ENTRIES_PER_FRAME,
) -> Iterator[Tuple[List[FileEntry], List[str]]]:
    """
    Like L{splitUpdate}, lazily: each piece is measured only when it is
    asked for, so that a sender producing one frame at a time spends a
    frame's worth of work at a time, however large the whole.  Yields at
    least one pair, possibly C{([], [])}.
    """
    entries: List[FileEntry] = []
    names: List[str] = []
    used = 0
    sent = False
    for kind, item in itertools.chain(((0, e) for e in changed), ((1, n) for n in removed)):
        cost = _cost(item)
        if (entries or names) and (used + cost > budget or len(entries) + len(names) >= count):
            yield entries, names
            sent = True
            entries, names, used = [], [], 0
        if kind == 0:
            entries.append(item)
        else:
            names.append(item)
        used += cost
    if entries or names or not sent:
        yield entries, names


def _entryJson(entry: Any) -> str:
    """
    C{entry}'s JSON exactly as L{encode} writes it (C{_dumps(entry.toDict())}),
    made directly for a well-formed L{FileEntry}; L{WireError} for an entry
    the receiver would refuse.
    """
    if type(entry) is FileEntry:
        size, mtime, sha256 = entry.size, entry.mtime, entry.sha256
        if (
            type(size) is int and 0 <= size <= MAX_FILE_SIZE
            and type(mtime) is float and mtime - mtime == 0.0
            and type(sha256) is str and len(sha256) == 64 and not sha256.strip(_HEX)
            and type(entry.name) is str
        ):
            return '{"name":%s,"size":%s,"mtime":%s,"sha256":"%s"}' % (
                encode_basestring_ascii(entry.name), int.__repr__(size), float.__repr__(mtime), sha256,
            )
    try:
        FileEntry.fromDict(json.loads(_dumps(entry)))
    except (TypeError, ValueError) as e:
        raise WireError(f"cannot encode {type(entry).__name__}: {e}") from None
    return _dumps(entry)


def deltaFrames(
    incarnation: str,
    seq: int,
    full: bool,
    changed: Iterable[FileEntry],
    removed: Iterable[str],
    budget: int = ITEM_BUDGET,
    count: int = ENTRIES_PER_FRAME,
) -> Iterator[bytes]:
    """
    The C{index-delta} frames of one answer, encoded, lazily: byte for byte
    what L{encode} makes of the messages of L{iterUpdate}'s pieces, the last
    one marked C{last}, with each entry's JSON made once (L{iterUpdate}
    measures it, L{encode} makes it again and decodes its own output, which
    for a list of entries is most of the work).  Each frame is checked
    against L{MAX_FRAME}; a piece that does not fit (an item alone over the
    budget) raises L{WireError}, as L{encode} would.  Yields at least one
    frame.
    """
    if type(incarnation) is not str or type(seq) is not int or seq < 0 or type(full) is not bool:
        raise WireError("index-delta envelope has the wrong types")
    head = '%s{"type":"index-delta","incarnation":%s,"seq":%d,"full":%s,"entries":[' % (
        CONTROL.decode("ascii"), encode_basestring_ascii(incarnation), seq, "true" if full else "false",
    )

    def frame(entries: List[str], names: List[str], last: bool) -> bytes:
        data = '%s%s],"removed":[%s],"last":%s}' % (
            head, ",".join(entries), ",".join(names), "true" if last else "false",
        )
        encoded = data.encode("ascii")
        if len(encoded) > MAX_FRAME:
            raise WireError(f"index-delta message is {len(encoded)} bytes, over the frame limit of {MAX_FRAME}")
        return encoded

    def pieces() -> Iterator[Tuple[List[str], List[str]]]:
        entries: List[str] = []
        names: List[str] = []
        used = 0
        for kind, item in itertools.chain(((0, e) for e in changed), ((1, n) for n in removed)):
            if kind == 0:
                text = _entryJson(item)
            elif type(item) is str:
                text = encode_basestring_ascii(item)
            else:
                raise WireError(f"a removed name is a {type(item).__name__}")
            cost = len(text) + 1
            if (entries or names) and (used + cost > budget or len(entries) + len(names) >= count):
                yield entries, names
                entries, names, used = [], [], 0
            (entries if kind == 0 else names).append(text)
            used += cost
        yield entries, names

    ahead = pieces()
    current = next(ahead)
    for following in ahead:
        yield frame(current[0], current[1], False)
        current = following
    yield frame(current[0], current[1], True)
