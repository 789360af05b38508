"""
Which file names p2pfiles accepts.

A shared file is named by a single path segment of its share directory.  This
module is the one place that decides whether a name is acceptable; every node
checks names it is asked for here, and the client checks them before sending
so the user gets the error at once.
"""

import hashlib
from typing import Optional

# Longest name accepted, in UTF-8 bytes: the common file system limit.
MAX_NAME_BYTES = 255

# A download of NAME is kept as .NAME.part until it is verified.
_PART_PREFIX = "."
_PART_SUFFIX = ".part"


class BadName(ValueError):
    """
    A file name that p2pfiles refuses.  The string form is a one-line reason.
    """


def nameProblem(name: object) -> Optional[str]:
    """
    Return why C{name} is not an acceptable shared file name, or L{None} if
    it is.

    Refused: anything but a non-empty string; names containing C{/}, C{\\}
    or NUL; names starting with C{.} (hidden files, which include partial
    downloads, C{.} and C{..}); names longer than L{MAX_NAME_BYTES} in UTF-8;
    names that are not valid Unicode text.  Other characters, newlines and
    tabs included, are legal in file names and are shared: every place that
    writes a name (the wire, C{peer_files.log}) escapes it.
    """
    if not isinstance(name, str):
        return "file name must be a string"
    if not name:
        return "file name is empty"
    if name.startswith("."):
        return "file name must not start with '.'"
    if "/" in name or "\\" in name:
        return "file name must not contain '/' or '\\'"
    if "\0" in name:
        return "file name must not contain NUL"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if len(encoded) > MAX_NAME_BYTES:
        return f"file name is longer than {MAX_NAME_BYTES} bytes"
    return None


def checkName(name: object) -> str:
    """
    Return C{name} if it is acceptable, else raise L{BadName} with the
    reason.
    """
    problem = nameProblem(name)
    if problem is not None:
        raise BadName(f"bad file name {name!r}: {problem}")
    assert isinstance(name, str)
    return name


def partName(name: str) -> str:
    """
    The hidden name under which a download of C{name} is kept until it is
    verified.  It starts with C{.}, so it is never shared or accepted as a
    request.

    It is C{.NAME.part} when that fits in L{MAX_NAME_BYTES} UTF-8 bytes.  A
    name within 6 bytes of the limit gets a fixed-length name made from its
    SHA-256 instead, C{.p2pfiles-<40 hex digits>.part}, the same each time so
    that a later attempt finds the part again.  A shared name could be chosen
    to give the same part name as a long one: the two downloads then take
    turns (one writer per part), and a part resumed by the wrong one is a
    wrong prefix, which verification throws away.
    """
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) + len(_PART_PREFIX) + len(_PART_SUFFIX) <= MAX_NAME_BYTES:
        return _PART_PREFIX + name + _PART_SUFFIX
    return _PART_PREFIX + "p2pfiles-" + hashlib.sha256(encoded).hexdigest()[:40] + _PART_SUFFIX
