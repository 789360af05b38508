"""
p2pfiles: a small-cluster file-sharing service built on Twisted.
"""

__version__ = "0.1.0.dev0"
