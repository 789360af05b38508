"""
Tests for L{p2pfiles.names}: which file names p2pfiles accepts.

The length tests use literal byte counts, not L{MAX_NAME_BYTES}, so that a
change to the limit, or to how it is measured, fails here.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.names import MAX_NAME_BYTES, BadName, checkName, nameProblem

# Property tests: enough examples to find edge cases, no deadline, no example
# database written into the work tree.
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Characters of 1, 2, 3 and 4 UTF-8 bytes.
ONE, TWO, THREE, FOUR = "a", "\u00e9", "\u20ac", "\U0001f600"


def utf8Length(name: str) -> int:
    return len(name.encode("utf-8"))


class LengthTests(SynchronousTestCase):
    """
    Names are limited to 255 bytes of UTF-8, not 255 characters.
    """

    def assertAccepted(self, name: str) -> None:
        self.assertIsNone(nameProblem(name))
        self.assertEqual(checkName(name), name)

    def assertTooLong(self, name: str) -> None:
        self.assertEqual(nameProblem(name), "file name is longer than 255 bytes")
        self.assertRaises(BadName, checkName, name)

    def test_limit(self) -> None:
        """
        The limit is 255 bytes, the common file system limit.  Catches a
        change of the constant (the tests below catch a change of how it is
        applied).
        """
        self.assertEqual(MAX_NAME_BYTES, 255)

    def test_255BytesAccepted(self) -> None:
        """
        A name of exactly 255 ASCII bytes is accepted.  Catches a limit
        lowered by one (254) and a check written C{>=} instead of C{>}.
        """
        self.assertAccepted(ONE * 255)

    def test_256BytesRefused(self) -> None:
        """
        A name of 256 ASCII bytes is refused with the reason.  Catches a
        limit raised by one (256) and a missing length check.
        """
        self.assertTooLong(ONE * 256)

    def test_multibyteOverLimitRefused(self) -> None:
        """
        Names over 255 bytes are refused although they have far fewer than
        255 characters (128, 86 and 64 here), including one a single byte
        over.  Catches counting characters (C{len(name)}) or UTF-16 code
        units instead of UTF-8 bytes.
        """
        for name in (TWO * 127 + ONE * 2, TWO * 128, THREE * 86, FOUR * 64):
            self.assertGreater(utf8Length(name), 255)
            self.assertLess(len(name), 255)
            self.assertTooLong(name)

    def test_multibyteAt255BytesAccepted(self) -> None:
        """
        Names of exactly 255 bytes made of 2-, 3- and 4-byte characters are
        accepted.  Catches a limit lowered by one or applied with C{>=}
        when the name is not ASCII, and measuring a longer form than UTF-8
        (UTF-16 or UTF-32 bytes, or the JSON-escaped length).
        """
        for name in (TWO * 127 + ONE, THREE * 85, FOUR * 63 + ONE * 3, ONE + TWO + THREE + FOUR * 62 + ONE):
            self.assertEqual(utf8Length(name), 255)
            self.assertAccepted(name)


class RefusedTests(SynchronousTestCase):
    """
    Names that are not a single, visible, valid path segment are refused,
    each with its reason.
    """

    def assertRefused(self, name: object, reason: str) -> None:
        """
        C{name} is refused by L{nameProblem} with C{reason}, and L{checkName}
        raises L{BadName} (a L{ValueError}) naming it and giving the reason.
        """
        self.assertEqual(nameProblem(name), reason)
        error = self.assertRaises(BadName, checkName, name)
        self.assertIsInstance(error, ValueError)
        self.assertIn(reason, str(error))
        self.assertIn(repr(name), str(error))

    def test_nul(self) -> None:
        """
        NUL anywhere in a name is refused: no file system stores it.
        Catches a missing NUL check.
        """
        for name in ("a\0b", "\0", "a\0"):
            self.assertRefused(name, "file name must not contain NUL")

    def test_loneSurrogates(self) -> None:
        """
        A name holding a lone surrogate (which a peer can send as a JSON
        escape) is not valid Unicode text and is refused rather than raising
        C{UnicodeEncodeError}.  Catches a missing or wrong encoding check.
        """
        for name in ("a\ud800b", "\udfff", "\udc80" + ONE * 10, "\ud83d"):
            self.assertRefused(name, "file name is not valid UTF-8")

    def test_separators(self) -> None:
        """
        C{/} and C{\\} are refused anywhere: a name is one path segment on
        every system.  Catches a check of only one separator or only of the
        start.
        """
        for name in ("a/b", "/", "a/", "/a", "a\\b", "\\", "a\\"):
            self.assertRefused(name, "file name must not contain '/' or '\\'")

    def test_leadingDot(self) -> None:
        """
        Names starting with C{.} (hidden files, partial downloads, C{.} and
        C{..}) are refused.  Catches a missing check.
        """
        for name in (".hidden", ".", "..", ".a.part", "./a"):
            self.assertRefused(name, "file name must not start with '.'")

    def test_dotsElsewhereAccepted(self) -> None:
        """
        Dots after the first character are ordinary.  Catches refusing any
        name containing a dot (or C{..}) instead of only a leading one.
        """
        for name in ("a.txt", "a.", "a..b", "a...", "archive.tar.gz"):
            self.assertIsNone(nameProblem(name))

    def test_empty(self) -> None:
        """
        The empty name is refused.  Catches a missing emptiness check.
        """
        self.assertRefused("", "file name is empty")

    def test_notAString(self) -> None:
        """
        Anything but a string (bytes, numbers, None, lists) is refused, not
        an exception.  Catches a missing type check.
        """
        for name in (None, b"a", 1, 1.5, ["a"], {"name": "a"}, True):
            self.assertRefused(name, "file name must be a string")

    def test_otherCharactersAccepted(self) -> None:
        """
        Every other character is legal in a file name and accepted: spaces,
        tabs, newlines, other control characters, quotes, non-ASCII text.
        Catches refusing characters the places that write names escape.
        """
        for name in ("a b", "a\tb", "a\nb", "\r", "\x01", "\x7f", '"', "'", "caf\u00e9", FOUR, "\u2028", "-"):
            self.assertEqual(checkName(name), name)


# Characters of every kind: any code point including lone surrogates, and,
# often, the ones names may not hold or start with.
anyCharacters = st.characters() | st.sampled_from(["/", "\\", "\0", ".", TWO, THREE, FOUR])
anyNames = st.text(anyCharacters, max_size=300) | anyCharacters.map(lambda c: c * 128)
# Characters a name may hold.
legalCharacters = st.characters(codec="utf-8", exclude_characters="/\\\0")


class PropertyTests(SynchronousTestCase):
    """
    What every accepted name has in common.
    """

    @PROPERTY
    @given(anyNames)
    def test_acceptedNamesAreSafe(self, name: str) -> None:
        """
        Any accepted name round-trips through UTF-8, is 1 to 255 bytes of
        it, and holds no C{/}, C{\\} or NUL nor starts with C{.}; any
        refused one makes L{checkName} raise L{BadName} with the reason.
        """
        problem = nameProblem(name)
        if problem is None:
            self.assertEqual(checkName(name), name)
            encoded = name.encode("utf-8")
            self.assertEqual(encoded.decode("utf-8"), name)
            self.assertGreaterEqual(len(encoded), 1)
            self.assertLessEqual(len(encoded), 255)
            for refused in ("/", "\\", "\0"):
                self.assertNotIn(refused, name)
            self.assertFalse(name.startswith("."))
        else:
            self.assertIsInstance(problem, str)
            error = self.assertRaises(BadName, checkName, name)
            self.assertIn(problem, str(error))

    @PROPERTY
    @given(st.text(legalCharacters, min_size=1, max_size=255).filter(lambda name: not name.startswith(".")))
    def test_legalNamesAccepted(self, name: str) -> None:
        """
        Any name of legal characters not starting with C{.} is accepted up
        to 255 bytes and refused as too long beyond, whatever the mix of
        character widths.  Catches refusing legal names, which the property
        above alone would not.
        """
        if utf8Length(name) <= 255:
            self.assertEqual(checkName(name), name)
        else:
            self.assertEqual(nameProblem(name), "file name is longer than 255 bytes")
