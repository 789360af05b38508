"""
Run twistd under cProfile and write the profile when it stops.

C{python -m cProfile twistd ...} writes nothing for a node stopped by
SIGTERM: twistd re-raises the signal after shutting down
(C{twisted.application.app._exitWithSignal}), which kills the process before
cProfile can save.  This wrapper exits normally instead.  Used by
C{bench/transfer.py --profile}.

Usage: python bench/profiled_twistd.py OUT.prof PATH-OF-TWISTD TWISTD-ARGS...
"""

import cProfile
import sys

from twisted.application import app
from twisted.scripts.twistd import run


def main() -> None:
    output = sys.argv[1]
    sys.argv = ["twistd"] + sys.argv[3:]
    app._exitWithSignal = lambda sig: None
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run()
    finally:
        profiler.disable()
        profiler.dump_stats(output)


if __name__ == "__main__":
    main()
