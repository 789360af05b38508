"""
The status page as the node renders it: a complete snapshot that works
without JavaScript, which C{static/app.js} then keeps live by building the
same markup from the same data.

The template (C{static/index.html}) holds markers C{<!--@name-->}; each is
replaced, in one pass, by HTML built here with every value escaped.  Values
are shown as text with control, bidirectional-override and lone surrogate
characters made visible, since file names, addresses and reasons come from
peers.
"""

import html
import re
import time
from typing import Any, Dict, List, Optional

from p2pfiles.events import MAX_TEXT, boundText
from p2pfiles.units import humanSize

_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def visible(text: object) -> str:
    """
    C{text} with control, bidirectional-override and lone surrogate
    characters shown as escapes: a hostile name cannot hide or reorder what
    is around it.
    """

    def escape(match: "re.Match[str]") -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _INVISIBLE.sub(escape, str(text))


def _h(value: object) -> str:
    """
    C{value} as HTML text or attribute value.
    """
    return html.escape(visible(boundText(str(value), MAX_TEXT * 5)), quote=True)




def _clockTime(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def _isoTime(seconds: object) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _peer(peer: object) -> str:
    if isinstance(peer, int) and not isinstance(peer, bool):
        return f"node {peer}"
    return str(peer)


def describeEvent(event: Dict[str, Any]) -> str:
    """
    One line saying what an event means (plain text; escape to show it).
    """
    kind = event.get("kind")
    get = event.get
    if kind == "leader":
        leader = get("leader")
        who = "no leader" if leader is None else f"node {leader} leads"
        return f"{who}, epoch {get('epoch')}"
    if kind in ("member-up", "member-down"):
        at = f" at {get('address')}" if get("address") else ""
        return f"node {get('member')}{at} is {'up' if kind == 'member-up' else 'down'}"
    if kind in ("transfer-done", "transfer-failed"):
        verb = {"serve": "served", "relay": "relayed", "receive": "received"}.get(get("direction"), "moved")
        towards = "from" if get("direction") == "receive" else "to"
        line = f"{verb} {get('name')} {towards} {_peer(get('peer'))}"
        if kind == "transfer-failed":
            return f"{line} failed: {get('reason')}"
        seconds = get("seconds")
        if isinstance(seconds, (int, float)):
            line += f" in {seconds * 1000:.0f} ms" if seconds < 1 else f" in {seconds:.1f} s"
        return f"{line} ({humanSize(get('bytes'))})" if "bytes" in event else line
    if kind == "rejected":
        peer = f" {_peer(get('peer'))}" if get("peer") is not None else ""
        return f"refused{peer}: {get('reason')}"
    return " ".join(f"{key}={value}" for key, value in event.items() if key not in ("time", "kind"))


def _leaderSince(status: Dict[str, Any], events: List[Dict[str, Any]]) -> Optional[float]:
    """
    When the current leader was last announced, if the events still say.
    """
    for event in reversed(events):
        if event.get("kind") == "leader":
            if event.get("leader") == status.get("leader") and event.get("epoch") == status.get("epoch"):
                return event.get("time")
            return None
    return None


def _memberRows(status: Dict[str, Any]) -> List[str]:
    rows = []
    leader = status.get("leader")
    for member in status.get("members", []):
        mid = member.get("id")
        alive = bool(member.get("alive"))
        classes = ["leader" if mid == leader else "", "self" if mid == status.get("id") else ""]
        role = "leader" if mid == leader else "member"
        tag = ' <span class="tag">this node</span>' if mid == status.get("id") else ""
        fingerprint = member.get("fingerprint")
        fp = f'<td class="fp mono" title="{_h(fingerprint)}">{_h(fingerprint)}</td>' if fingerprint else '<td class="fp muted">—</td>'
        state = "alive" if alive else "down"
        rows.append(
            f'<tr data-member="{_h(mid)}" data-alive="{"true" if alive else "false"}" class="{" ".join(c for c in classes if c)}">'
            f'<td class="num">{_h(mid)}</td>'
            f'<td><span class="state" data-state="{state}">{state}</span></td>'
            f"<td>{role}{tag}</td>"
            f'<td class="mono">{_h(member.get("address", ""))}</td>'
            f"{fp}</tr>"
        )
    return rows or ['<tr class="empty"><td colspan="5">no members known</td></tr>']


def _fileRows(files: Optional[List[Dict[str, Any]]]) -> List[str]:
    if files is None:
        return ['<tr class="empty"><td colspan="4">the file list did not arrive in time; reload to try again</td></tr>']
    if not files:
        return ['<tr class="empty"><td colspan="4">no files shared</td></tr>']
    rows = []
    for entry in files:
        holders = "".join(f'<span class="chip">{_h(holder)}</span>' for holder in entry.get("holders", []))
        sha = str(entry.get("sha256", ""))
        rows.append(
            f'<tr data-name="{_h(entry.get("name", ""))}">'
            f'<td class="name">{_h(entry.get("name", ""))}</td>'
            f'<td class="num">{_h(humanSize(entry.get("size")))}</td>'
            f"<td>{holders}</td>"
            f'<td class="mono muted" title="{_h(sha)}">{_h(sha[:12])}</td></tr>'
        )
    return rows


def _rate(transfer: Dict[str, Any], now: float) -> Optional[float]:
    started, done = transfer.get("started"), transfer.get("bytes")
    if not isinstance(started, (int, float)) or not isinstance(done, (int, float)) or now - started <= 0:
        return None
    return done / (now - started)


def _transferRows(transfers: List[Dict[str, Any]], now: float) -> List[str]:
    if not transfers:
        return ['<tr class="empty"><td colspan="5">none</td></tr>']
    rows = []
    for transfer in transfers:
        done, size = transfer.get("bytes", 0), transfer.get("size", 0)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (done, size))
        percent = f" · {100 * done / size:.0f}%" if numeric and size > 0 else ""
        bar = f'<progress max="{_h(size)}" value="{_h(done)}"></progress>' if numeric and size > 0 else "<progress></progress>"
        rate = _rate(transfer, now)
        rows.append(
            f'<tr><td class="name">{_h(transfer.get("name", ""))}</td>'
            f'<td><span class="dir" data-dir="{_h(transfer.get("direction", ""))}">{_h(transfer.get("direction", ""))}</span></td>'
            f'<td class="nowrap">{_h(_peer(transfer.get("peer", "")))}</td>'
            f'<td class="progress-col">{bar}<span class="muted small">{_h(humanSize(done))} of {_h(humanSize(size))}{percent}</span></td>'
            f'<td class="num">{_h(humanSize(rate) + "/s") if rate is not None else "—"}</td></tr>'
        )
    return rows


def _eventItems(events: List[Dict[str, Any]]) -> List[str]:
    if not events:
        return ['<li class="empty">nothing yet</li>']
    return [
        f'<li data-kind="{_h(event.get("kind", ""))}">'
        f'<time datetime="{_isoTime(event.get("time"))}">{_clockTime(event.get("time"))}</time>'
        f'<span class="kind">{_h(event.get("kind", ""))}</span>'
        f'<span class="what">{_h(describeEvent(event))}</span></li>'
        for event in reversed(events)
    ]


_MARKER = re.compile(r"<!--@([a-z-]+)-->")


def renderPage(
    template: str,
    status: Dict[str, Any],
    files: Optional[List[Dict[str, Any]]],
    transfers: List[Dict[str, Any]],
    events: List[Dict[str, Any]],
    now: float,
) -> str:
    """
    The status page as it is at C{now}; C{files} is None when the listing
    did not arrive.
    """
    members = status.get("members", [])
    alive = [m for m in members if m.get("alive")]
    down = [m for m in members if not m.get("alive")]
    leader = status.get("leader")
    since = _leaderSince(status, events)
    rates = [r for r in (_rate(t, now) for t in transfers) if r is not None]
    sizes = [f.get("size") for f in files or [] if isinstance(f.get("size"), int)]
    parts = {
        "node-id": _h(status.get("id", "?")),
        "node-address": _h(status.get("address", "")),
        "role": _h(status.get("role", "")),
        "rendered": _h(_clockTime(now)),
        "leader": "none" if leader is None else _h(leader),
        "leader-address": _h(next((m.get("address", "") for m in members if m.get("id") == leader), "")),
        "epoch": _h(status.get("epoch", "?")),
        "leader-since": f"since {_clockTime(since)}" if since is not None else "",
        "alive-count": str(len(alive)),
        "member-count": str(len(members)),
        "any-down": "true" if down else "false",
        "down-list": _h("down: " + ", ".join(str(m.get("id")) for m in down)) if down else "all up",
        "members-class": "" if any(m.get("fingerprint") for m in members) else "no-fp",
        "members": "\n".join(_memberRows(status)),
        "file-count": "—" if files is None else str(len(files)),
        "file-shown": f"({len(files)})" if files else "",
        "file-total": "" if files is None else _h(humanSize(sum(sizes)) + " in total"),
        "files": "\n".join(_fileRows(files)),
        "transfer-count": str(len(transfers)),
        "transfer-rate": _h(humanSize(sum(rates)) + "/s") if rates else "idle",
        "transfers": "\n".join(_transferRows(transfers, now)),
        "events": "\n".join(_eventItems(events)),
        "version": _h(status.get("version", "")),
    }
    return _MARKER.sub(lambda match: parts.get(match.group(1), ""), template)
