"""
Tests for L{p2pfiles.packed}: a packed map reads exactly as the C{dict} it
stands for, through any sequence of changes and compactions.
"""

from typing import Dict, List, Tuple

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pfiles.packed import COMPACT_MIN, PackedBuilder, PackedFiles, packItems

# A few names, so that changes hit the same ones; odd characters included
# (outside the BMP, a lone surrogate) as their UTF-8 order must be str order.
_names = st.sampled_from(["a", "b", "ab", "z", "é", "\U0001f600", "\ud800", "\uffff", "a\u00e9", "IMG_0001.jpg"]) | st.text(min_size=1, max_size=4)
_records = st.binary(min_size=48, max_size=48)


def record(tag: str) -> bytes:
    return tag.encode("ascii").ljust(48, b".")


class PackedFilesTests(SynchronousTestCase):
    def assertSameAs(self, files: PackedFiles, model: Dict[str, bytes]) -> None:
        self.assertEqual(len(files), len(model))
        self.assertEqual(list(files.items()), sorted(model.items()))
        self.assertEqual(list(files), sorted(model))
        for name, value in model.items():
            self.assertEqual(files[name], value)
            self.assertIn(name, files)
        self.assertTrue(files == model)
        self.assertNotIn("never-a-name", files)
        self.assertIsNone(files.get("never-a-name"))
        self.assertRaises(KeyError, lambda: files["never-a-name"])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(_names, _records)),
        st.lists(st.tuples(st.dictionaries(_names, _records, max_size=4), st.lists(_names, max_size=3)), max_size=6),
    )
    def test_readsAsTheDict(self, initial: List[Tuple[str, bytes]], steps: List[Tuple[Dict[str, bytes], List[str]]]) -> None:
        """
        Built from pairs in any order (a later pair of a name winning), then
        changed step by step, compacted and rebased at every step, a map
        always reads as the dict the same steps make.
        """
        model = dict(initial)
        files = packItems(initial)
        self.assertSameAs(files, model)
        for records, removed in steps:
            older = files
            files = files.changed(records, removed)
            model.update(records)
            for name in removed:
                model.pop(name, None)
            self.assertSameAs(files, model)
            differences = files.differences(older)
            self.assertIsNotNone(differences)
            for name in set(model) | set(older):
                if model.get(name) != older.get(name):
                    self.assertEqual(differences.pop(name), model.get(name))
            self.assertEqual(differences, {})
            compacted = older.compacted()
            self.assertEqual(compacted.changeCount, 0)
            self.assertSameAs(compacted, dict(older.items()))
            rebased = files.rebased(older, compacted)
            self.assertSameAs(rebased, model)
            self.assertIsNone(rebased.rebased(older, compacted), "no longer on older's buffers")

    def test_unchangedIsSelf(self) -> None:
        """
        A change that changes nothing gives the very same map back.
        """
        files = packItems([("a", record("a")), ("b", record("b"))])
        self.assertIs(files.changed({"a": record("a")}, ["missing"]), files)
        self.assertIs(files.changed({}, []), files)

    def test_inOrderIsAllPacked(self) -> None:
        """
        Pairs in name order are all packed; only pairs out of order are
        kept as changes beside them.
        """
        builder = PackedBuilder()
        for name in ["a", "b", "c"]:
            builder.add(name, record(name))
        self.assertEqual(builder.build().changeCount, 0)
        for tag, name in enumerate(["a", "c", "b", "c"]):
            builder.add(name, record(f"{name}{tag}"))
        files = builder.build()
        self.assertEqual(files.changeCount, 2)
        self.assertEqual(dict(files.items()), {"a": record("a0"), "b": record("b2"), "c": record("c3")})

    def test_wrongRecordSize(self) -> None:
        """
        Only 48-byte records go in.
        """
        self.assertRaises(ValueError, PackedBuilder().add, "a", b"short")

    def test_wantsCompacting(self) -> None:
        """
        A map asks to be compacted once its changes reach L{COMPACT_MIN},
        and none are left after.
        """
        files = packItems((f"n{i:06d}", record("x")) for i in range(10))
        files = files.changed({f"m{i:06d}": record("y") for i in range(COMPACT_MIN - 1)}, [])
        self.assertFalse(files.wantsCompacting())
        files = files.changed({"last": record("y")}, [])
        self.assertTrue(files.wantsCompacting())
        compacted = files.compacted()
        self.assertFalse(compacted.wantsCompacting())
        self.assertEqual(compacted, files)

    def test_equality(self) -> None:
        """
        Maps equal when they hold the same pairs, whatever their layout;
        they compare with dicts too, and are not hashable.
        """
        packed = packItems([("a", record("a")), ("b", record("b"))])
        changed = packItems([("a", record("a"))]).changed({"b": record("b")}, [])
        self.assertEqual(packed, changed)
        self.assertEqual(packed, {"a": record("a"), "b": record("b")})
        self.assertNotEqual(packed, {"a": record("a")})
        self.assertNotEqual(packed, packItems([("a", record("a")), ("b", record("c"))]))
        self.assertEqual(PackedFiles.empty(), {})
        self.assertRaises(TypeError, hash, packed)

    def test_differencesOfUnrelatedMaps(self) -> None:
        """
        Maps built apart share no buffers: C{differences} says so.
        """
        one = packItems([("a", record("a"))])
        other = packItems([("a", record("a"))])
        self.assertIsNone(one.differences(other))
        self.assertEqual(one.differences(one), {})

    def test_oneName(self) -> None:
        """
        The smallest maps: none and one name.
        """
        empty = PackedFiles.empty()
        self.assertEqual((len(empty), list(empty.items())), (0, []))
        self.assertIsNone(empty.get("a"))
        one = empty.changed({"a": record("a")}, [])
        self.assertEqual(list(one.items()), [("a", record("a"))])
        self.assertEqual(len(one.changed({}, ["a"])), 0)

    def test_quicklyEqual(self) -> None:
        """
        C{quicklyEqual} says yes only when it can tell by the buffers: the
        same map, or both packed whole alike; a map with changes beside its
        buffers is not told equal that way, even when it is.
        """
        packed = packItems([("a", record("a")), ("b", record("b"))])
        self.assertTrue(packed.quicklyEqual(packed))
        self.assertTrue(packed.quicklyEqual(packItems([("a", record("a")), ("b", record("b"))])))
        self.assertFalse(packed.quicklyEqual(packItems([("a", record("a"))])))
        changed = packItems([("a", record("a"))]).changed({"b": record("b")}, [])
        self.assertFalse(packed.quicklyEqual(changed))
        self.assertEqual(packed, changed)
