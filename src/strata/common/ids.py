"""Tenant and timeline ids: 16 random bytes, printed as 32 lowercase hex digits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Self

from strata.common.errors import UserError


@dataclass(frozen=True, slots=True, order=True)
class _Id:
    raw: bytes

    def __post_init__(self) -> None:
        assert isinstance(self.raw, bytes) and len(self.raw) == 16, self.raw

    @classmethod
    def generate(cls) -> Self:
        return cls(os.urandom(16))

    @classmethod
    def parse(cls, text: str) -> Self:
        try:
            raw = bytes.fromhex(text)
        except ValueError as err:
            raise UserError(f"invalid {cls.__name__} {text!r}: expected 32 hex digits") from err
        if len(raw) != 16:
            raise UserError(f"invalid {cls.__name__} {text!r}: expected 32 hex digits")
        return cls(raw)

    def __str__(self) -> str:
        return self.raw.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.raw.hex()})"


class TenantId(_Id):
    """One customer's cluster (one initdb)."""


class TimelineId(_Id):
    """One line of WAL, with an optional ancestor and branch LSN."""
