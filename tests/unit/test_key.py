"""Keys: 18-byte encoding whose byte order is key order; ranges and constructors."""

from hypothesis import given, settings
from hypothesis import strategies as st

from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind
from strata.storage.key import (
    KEY_MAX,
    KEY_MIN,
    KEY_SIZE,
    Key,
    KeyRange,
    checkpoint_key,
    control_file_key,
    db_dir_key,
    db_dir_range,
    rel_block_key,
    rel_block_range,
    rel_size_key,
    rel_size_range,
    relmap_key,
    slru_block_key,
    slru_range,
    slru_segment_size_key,
    twophase_key,
    twophase_range,
)

u32 = st.integers(0, 0xFFFFFFFF)
u8 = st.integers(0, 0xFF)
keys = st.builds(Key, u8, u32, u32, u32, u8, u32)
rels = st.builds(RelTag, u32, u32, u32, st.integers(0, 3))


@given(keys)
def test_round_trip(k: Key) -> None:
    b = k.to_bytes()
    assert len(b) == KEY_SIZE
    assert Key.from_bytes(b) == k
    assert Key.from_int(k.to_int()) == k


@given(keys, keys)
def test_byte_order_is_key_order(a: Key, b: Key) -> None:
    assert (a < b) == (a.to_bytes() < b.to_bytes())
    assert (a == b) == (a.to_bytes() == b.to_bytes())


@given(keys.filter(lambda k: k != KEY_MAX))
def test_next_is_immediate_successor(k: Key) -> None:
    n = k.next()
    assert k < n
    assert n.to_int() == k.to_int() + 1


def test_next_carries() -> None:
    assert Key(0, 0, 0, 0, 0, 0xFFFFFFFF).next() == Key(0, 0, 0, 0, 1, 0)
    assert Key(0, 0, 0, 0xFFFFFFFF, 0xFF, 0xFFFFFFFF).next() == Key(0, 0, 1, 0, 0, 0)
    assert KEY_MIN < KEY_MAX


def test_key_range() -> None:
    r = KeyRange(Key(0, 0, 0, 0, 0, 10), Key(0, 0, 0, 0, 0, 20))
    assert r.contains(Key(0, 0, 0, 0, 0, 10))
    assert r.contains(Key(0, 0, 0, 0, 0, 19))
    assert not r.contains(Key(0, 0, 0, 0, 0, 20))
    assert not r.contains(Key(0, 0, 0, 0, 0, 9))
    assert r.overlaps(KeyRange(Key(0, 0, 0, 0, 0, 19), Key(0, 0, 0, 0, 0, 30)))
    assert not r.overlaps(KeyRange(Key(0, 0, 0, 0, 0, 20), Key(0, 0, 0, 0, 0, 30)))
    assert not r.overlaps(KeyRange(Key(0, 0, 0, 0, 0, 0), Key(0, 0, 0, 0, 0, 10)))


@given(rels, u32)
def test_rel_block_key_decodes(rel: RelTag, blkno: int) -> None:
    k = rel_block_key(rel, blkno)
    assert k.is_rel_block() and not k.is_rel_size()
    assert k.rel_tag() == rel
    assert k.blkno() == blkno
    assert rel_block_range(rel).contains(k)
    assert not rel_size_range(rel.spcnode, rel.dbnode).contains(k)
    assert k.is_page()


@given(rels, rels)
def test_rel_block_ranges_are_per_fork(a: RelTag, b: RelTag) -> None:
    assert rel_block_range(a).overlaps(rel_block_range(b)) == (a == b)


@given(rels)
def test_rel_size_keys_are_contiguous_per_db(rel: RelTag) -> None:
    k = rel_size_key(rel)
    assert k.is_rel_size() and k.rel_tag() == rel
    assert rel_size_range(rel.spcnode, rel.dbnode).contains(k)
    other_db = (rel.dbnode + 1) % (1 << 32)
    assert not rel_size_range(rel.spcnode, other_db).contains(k)
    # the size range of a database contains no block key of any relation
    r = rel_size_range(rel.spcnode, rel.dbnode)
    assert not r.contains(rel_block_key(rel, 0))
    assert not r.overlaps(rel_block_range(rel))


def test_rel_block_range_is_ordered_by_blkno() -> None:
    rel = RelTag(1663, 5, 16384, 0)
    ks = [rel_block_key(rel, n) for n in (0, 1, 2, 1000, 0xFFFFFFFF)]
    assert ks == sorted(ks)
    assert all(rel_block_range(rel).contains(k) for k in ks)


def test_singletons_and_spaces_are_distinct() -> None:
    ks = [db_dir_key(1663, 5), relmap_key(1664, 0), relmap_key(1663, 5),
          slru_block_key(SlruKind.CLOG, 0, 0), slru_segment_size_key(SlruKind.CLOG, 0),
          twophase_key(742), checkpoint_key(), control_file_key(),
          rel_block_key(RelTag(1663, 5, 1, 0), 0), rel_size_key(RelTag(1663, 5, 1, 0))]
    assert len(set(ks)) == len(ks)
    assert len({k.to_bytes() for k in ks}) == len(ks)
    assert db_dir_range().contains(db_dir_key(1663, 5))
    assert db_dir_key(1663, 5).db() == (1663, 5)
    assert twophase_range().contains(twophase_key(742))
    assert twophase_key(742).xid() == 742
    assert not twophase_range().contains(checkpoint_key())


@settings(max_examples=50)
@given(st.sampled_from(list(SlruKind)), u32, u32)
def test_slru_keys(kind: SlruKind, segno: int, blkno: int) -> None:
    b = slru_block_key(kind, segno, blkno)
    s = slru_segment_size_key(kind, segno)
    assert b.is_slru_block() and not b.is_slru_segment_size()
    assert s.is_slru_segment_size() and not s.is_slru_block()
    assert b.slru_kind() == kind and b.segno() == segno and b.blkno() == blkno
    assert s < b
    assert slru_range(kind).contains(b) and slru_range(kind).contains(s)
    for other in SlruKind:
        if other != kind:
            assert not slru_range(other).contains(b)
