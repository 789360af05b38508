"""
The twistd plugin: C{twistd -n p2pfiles --id 1 --port 9001 ...}.
"""

from twisted.application.service import ServiceMaker

p2pfiles = ServiceMaker(
    "p2pfiles",
    "p2pfiles.tap",
    "A p2pfiles node: a small-cluster file-sharing service.",
    "p2pfiles",
)
