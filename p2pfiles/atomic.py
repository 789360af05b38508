"""
Atomic replacement of small files: write a temporary file in the same
directory, fsync it, rename it over the target, fsync the directory.  A reader
sees the old content or the new, never a mix, and a crash leaves no half
written file under the final name.

These functions block; callers on the reactor thread either write tiny files
(the epoch) or run them in a thread (the hash cache, C{peer_files.log}).
"""

import os

from twisted.python.filepath import FilePath


def atomicWrite(path: FilePath, data: bytes) -> None:
    """
    Replace the content of C{path} with C{data} atomically and durably.
    """
    directory = path.parent()
    temporary = directory.child("." + path.basename() + ".tmp")
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary.path, path.path)
    fsyncDirectory(directory)


def fsyncDirectory(directory: FilePath) -> None:
    """
    Make a rename inside C{directory} durable.
    """
    fd = os.open(directory.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
