"""
The per-entry cost of a full index transfer, without sockets: a list of
--files (100,000) entries is cut into index-delta frames as the sender cuts
them (IndexSender: deltaFrames, each entry's JSON made once), and each frame
is decoded as the receiver decodes it.  Beside it, the way frames were made
before deltaFrames (iterUpdate measures each entry, then encode of each
piece, which decodes its own output), as the baseline of the same run; the
frames of both must be the same bytes.  Prints entries/s (CPU time of this
process), median of --runs (5).

Usage: .venv/bin/python bench/wirecodec.py [--files 100000] [--runs 5]
"""

import argparse
import statistics
import time

from p2pfiles.wire import MAX_FRAME, FileEntry, Message, decode, deltaFrames, encode, iterUpdate


def entries(count: int):
    return [FileEntry(f"photo-{k:07d}.jpg", 1000 + k * 7, 1700000000.123456 + k, "%064x" % (k * 2654435761)) for k in range(count)]


def sendNow(files):
    return list(deltaFrames("0123456789abcdef", 7, True, files, []))


def sendBefore(files):
    frames = []
    pieces = iterUpdate(files, [])
    piece = next(pieces)
    while piece is not None:
        following = next(pieces, None)
        frames.append(
            encode(
                Message("index-delta", incarnation="0123456789abcdef", seq=7, full=True, entries=piece[0], removed=piece[1], last=following is None)
            )
        )
        piece = following
    return frames


def receive(frames):
    got = []
    for frame in frames:
        got.extend(decode(frame).entries)
    return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    files = entries(args.files)
    before, sent, received = [], [], []
    for _ in range(args.runs):
        t = time.process_time()
        old = sendBefore(files)
        before.append(time.process_time() - t)
        t = time.process_time()
        frames = sendNow(files)
        sent.append(time.process_time() - t)
        t = time.process_time()
        got = receive(frames)
        received.append(time.process_time() - t)
        assert frames == old and got == files and max(map(len, frames)) <= MAX_FRAME
    b, s, r = statistics.median(before), statistics.median(sent), statistics.median(received)
    print(f"{args.files} entries in {len(frames)} frames (largest {max(map(len, frames))} bytes)")
    print(f"sender, iterUpdate + encode: {args.files / b:12,.0f} entries/s ({b:.3f} s)")
    print(f"sender, deltaFrames:         {args.files / s:12,.0f} entries/s ({s:.3f} s), {b / s:.1f}x")
    print(f"receiver, decode:            {args.files / r:12,.0f} entries/s ({r:.3f} s)")
    print(f"sender + receiver:           {args.files / (s + r):12,.0f} entries/s")


if __name__ == "__main__":
    main()
