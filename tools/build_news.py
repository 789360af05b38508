"""
Print NEWS as the fragments in newsfragments/ build it (towncrier draft of
the unreleased version), so `make news` and `make check-news` agree.
"""

import subprocess
import sys

from p2pfiles import __version__

HEADER = """\
p2pfiles NEWS
=============

Built from newsfragments/ by `make news` (towncrier); do not edit by hand.

"""


def main() -> None:
    draft = subprocess.run(
        [sys.executable, "-m", "towncrier", "build", "--draft", "--version", __version__, "--date", "unreleased"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    body = draft.strip("\n")
    sys.stdout.write(HEADER + body + "\n")


if __name__ == "__main__":
    main()
