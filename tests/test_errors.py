"""
Tests for L{p2pfiles.errors}: the one error type and its refusal codes.
"""

import ast
from typing import List, Tuple

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.errors import CODES, P2PError

PACKAGE = FilePath(__file__).parent().sibling("p2pfiles")


class P2PErrorTests(SynchronousTestCase):
    """
    L{P2PError}.
    """

    def test_knownCodeKept(self) -> None:
        """
        A known code is kept as given, and the reason is the string form.
        """
        error = P2PError("not found: a.txt", "not-found")
        self.assertEqual(error.code, "not-found")
        self.assertEqual(error.reason, "not found: a.txt")
        self.assertEqual(str(error), "not found: a.txt")
        self.assertEqual(repr(error), "P2PError('not found: a.txt', 'not-found')")

    def test_defaultCodeIsInternal(self) -> None:
        """
        Without a code, an error is an internal one (a bug on the end that
        reports it).
        """
        self.assertEqual(P2PError("oops").code, "internal")

    def test_unknownCodeBecomesRefused(self) -> None:
        """
        A code this end does not know (a newer peer's, or garbage) becomes
        C{"refused"}, and the reason keeps what the peer said, with the code
        it sent.
        """
        error = P2PError("quota exceeded", "quota")
        self.assertEqual(error.code, "refused")
        self.assertEqual(str(error), "quota exceeded ('quota')")

    def test_unknownCodeTruncated(self) -> None:
        """
        A peer cannot make the reason grow without bound through the code:
        at most 40 characters of an unknown code are kept.
        """
        error = P2PError("no", "x" * 10000)
        self.assertEqual(error.code, "refused")
        self.assertEqual(str(error), "no (%r)" % ("x" * 40,))

    def test_everyCodeDescribed(self) -> None:
        """
        Every code has a one-line, non-empty description.
        """
        self.assertIn("refused", CODES)
        for code, description in CODES.items():
            self.assertIsInstance(description, str, code)
            self.assertTrue(description.strip(), code)
            self.assertNotIn("\n", description, code)

    def test_codesUsedByThePackageAreKnown(self) -> None:
        """
        Every refusal code written as a literal in the package (a
        C{P2PError(..., "code")}, a C{sendError}/C{refuse}/C{_refuse} call, a
        C{drop(..., code=...)}) is in L{CODES}: a typo would otherwise reach
        the other end as C{"refused"}.
        """
        used = _literalCodes()
        self.assertGreater(len(used), 20, "the scan found too few codes to be looking at the right calls")
        unknown = [(where, code) for where, code in used if code not in CODES]
        self.assertEqual(unknown, [])


def _literalCodes() -> List[Tuple[str, str]]:
    """
    C{(module:line, code)} for every refusal code given as a string literal
    in a call that takes one.
    """
    found = []
    for path in sorted(PACKAGE.globChildren("*.py")):
        tree = ast.parse(path.getContent().decode("utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            candidates = []
            if name == "P2PError" and len(node.args) >= 2:
                candidates.append(node.args[1])
            if name in ("sendError", "refuse", "_refuse") and node.args:
                candidates.append(node.args[0])
            for keyword in node.keywords:
                if keyword.arg == "code" and name in ("P2PError", "drop", "refuse", "sendError"):
                    candidates.append(keyword.value)
            for candidate in candidates:
                if isinstance(candidate, ast.Constant) and isinstance(candidate.value, str):
                    found.append((f"{path.basename()}:{node.lineno}", candidate.value))
    return found
