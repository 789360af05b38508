"""
Sizes for people to read.  This module imports nothing else of the package.
"""


def humanSize(size: object) -> str:
    """
    C{size} bytes in binary units, one decimal: C{"4.6 MiB"}; C{"?"} for
    anything that is not a number (a page shows what a peer said).
    """
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        return "?"
    if size < 1024:
        return f"{size:g} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        # Judge by the rounded figure, so 1048575 is "1.0 MiB", not "1024.0 KiB".
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
