"""strata.pg.transam: the multixact id and member offset wraparound rules."""

from __future__ import annotations

from strata.pg.transam import FIRST_MULTIXACT_ID, U32_MASK, add_member_offset, next_multixact_id


def test_next_multixact_id_skips_invalid_zero_on_wraparound() -> None:
    assert next_multixact_id(1) == 2
    assert next_multixact_id(U32_MASK - 1) == U32_MASK
    assert next_multixact_id(U32_MASK) == FIRST_MULTIXACT_ID  # 0 is InvalidMultiXactId


def test_member_offsets_wrap_at_2_to_the_32() -> None:
    assert add_member_offset(10, 5) == 15
    assert add_member_offset(U32_MASK, 1) == 0  # offset 0 is valid for members
    assert add_member_offset(U32_MASK - 1, 3) == 1
