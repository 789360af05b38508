"""
The file in which a keeper of the cluster index (L{p2pfiles.gather}) leaves
its copy of each member's files when it stops, so that after a restart it
asks each member only for what changed since (nothing, when the member kept
its incarnation: see L{p2pfiles.sharescan}'s restart record) instead of
every file again.

The file, C{keeper.view} in the state directory, is binary and written and
read in pieces, never held whole:

  - the line C{p2pfiles keeper view 1};
  - one line of JSON: C{{"node": id, "members": [{"id", "address",
    "incarnation", "seq", "files"}, ...]}};
  - for each member, in that order, its files in pieces of at most
    L{PIECE} files: the length of the names (4 bytes, big-endian), the
    names in UTF-8 separated by NUL (which no name holds), and one 48-byte
    record per name (see L{p2pfiles.index.packEntry});
  - the SHA-256 of everything before it (32 bytes).

Anything else (another format, a wrong length, a bad digest) makes the whole
file count as absent: the keeper then gathers everything, which is always
correct.  Both functions block: run them in a thread.  Each piece costs a
few milliseconds of the interpreter lock, so the reactor thread keeps its
turns while a large view is read or written.
"""

import hashlib
import json
import os
import struct
from itertools import islice
from typing import Any, List, NamedTuple, Optional, Tuple

from twisted.python.filepath import FilePath

from p2pfiles.atomic import fsyncDirectory
from p2pfiles.packed import RECORD_SIZE, PackedBuilder, PackedFiles

MAGIC = b"p2pfiles keeper view 1\n"

# Files per piece: about 300 KB, a few milliseconds to build or parse.
PIECE = 4096

# The longest header line read: a member costs about 150 bytes of it.
MAX_HEADER = 1 << 20

_LENGTH = struct.Struct(">I")

__all__ = ["KeptMember", "ViewError", "loadView", "writeView"]


class ViewError(ValueError):
    """
    A view file that cannot be used; the string form says why, in a line.
    """


class KeptMember(NamedTuple):
    """
    A keeper's copy of one member's files: where the member was, which
    change of which incarnation the copy is at, and its name -> record map.
    """

    member: int
    address: str
    incarnation: str
    seq: int
    files: PackedFiles


def writeView(path: FilePath, me: int, members: List[KeptMember]) -> None:
    """
    Replace C{path} with the view of C{members}, atomically and durably
    (a temporary file beside it, fsynced, renamed, the rename fsynced).
    The maps in C{members} must not change while this runs.
    """
    directory = path.parent()
    directory.makedirs(ignoreExistingDirectory=True)
    temporary = directory.child("." + path.basename() + ".tmp")
    digest = hashlib.sha256()
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def put(data: bytes) -> None:
        digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    try:
        header = {
            "node": me,
            "members": [
                {"id": m.member, "address": m.address, "incarnation": m.incarnation, "seq": m.seq, "files": len(m.files)}
                for m in members
            ],
        }
        put(MAGIC + json.dumps(header).encode("utf-8") + b"\n")
        for m in members:
            items = iter(m.files.items())
            while True:
                piece = list(islice(items, PIECE))
                if not piece:
                    break
                names = "\0".join([name for name, record in piece]).encode("utf-8", "surrogatepass")
                put(_LENGTH.pack(len(names)) + names + b"".join([record for name, record in piece]))
        data = digest.digest()
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary.path)
        raise
    os.close(fd)
    os.replace(temporary.path, path.path)
    fsyncDirectory(directory)


class _Reader:
    # Reads exactly what is asked for, hashing it, or raises ViewError.

    def __init__(self, f: Any) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ViewError("the file is cut short")
        self.digest.update(data)
        return data

    def line(self) -> bytes:
        data = self.f.readline(MAX_HEADER)
        if not data.endswith(b"\n"):
            raise ViewError("the header is cut short or too long")
        self.digest.update(data)
        return data


def loadView(path: FilePath, me: int) -> Optional[List[KeptMember]]:
    """
    The members kept in the view file at C{path} by node C{me}; L{None} if
    there is no file.  Raises L{ViewError} if the file is not a whole view
    of this format, written by node C{me}.
    """
    try:
        f = open(path.path, "rb")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ViewError(f"cannot read it: {e}") from None
    with f:
        reader = _Reader(f)
        try:
            magic = reader.read(len(MAGIC))
        except ViewError:
            raise ViewError("not a keeper view of this format") from None
        if magic != MAGIC:
            raise ViewError("not a keeper view of this format")
        members = _header(reader.line(), me)
        kept = []
        for member, address, incarnation, seq, count in members:
            files = PackedBuilder()
            left = count
            while left:
                n = min(left, PIECE)
                (length,) = _LENGTH.unpack(reader.read(_LENGTH.size))
                try:
                    names = reader.read(length).decode("utf-8", "surrogatepass").split("\0")
                except UnicodeDecodeError:
                    raise ViewError("a name is not UTF-8") from None
                if len(names) != n:
                    raise ViewError("a piece holds the wrong number of names")
                records = reader.read(n * RECORD_SIZE)
                for at, name in enumerate(names):
                    files.add(name, records[at * RECORD_SIZE : (at + 1) * RECORD_SIZE])
                left -= n
            packed = files.build()
            if len(packed) != count:
                raise ViewError("a member's names repeat")
            kept.append(KeptMember(member, address, incarnation, seq, packed))
        expected = reader.digest.digest()
        if f.read(len(expected) + 1) != expected:
            raise ViewError("the digest does not match")
        return kept


def _header(line: bytes, me: int) -> List[Tuple[int, str, str, int, int]]:
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise ViewError("the header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("members"), list):
        raise ViewError("the header is malformed")
    if header.get("node") != me:
        raise ViewError(f"it was written by node {header.get('node')!r}, not by this node ({me})")
    members = []
    for item in header["members"]:
        if not isinstance(item, dict):
            raise ViewError("the header is malformed")
        values = tuple(item.get(k) for k in ("id", "address", "incarnation", "seq", "files"))
        member, address, incarnation, seq, count = values
        if not (
            all(type(v) is int and v >= 0 for v in (member, seq, count))
            and isinstance(address, str)
            and isinstance(incarnation, str)
        ):
            raise ViewError("the header is malformed")
        members.append((member, address, incarnation, seq, count))
    if len({m[0] for m in members}) != len(members):
        raise ViewError("a member is listed twice")
    return members
