"""smdist.records: the agent's records behave as the standard dataclasses they replace
(issue 18: the standard decorator was half the agent's start-up). Each case is checked
against ``dataclasses`` itself on the same class body."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from smdist import records


def _pair(frozen: bool) -> list[Any]:
    made = []
    for dc, fld in ((dataclasses.dataclass, dataclasses.field), (records.dataclass, records.field)):

        @dc(frozen=frozen)
        class Job:
            name: str
            hosts: int = 1
            tags: list[str] = fld(default_factory=list)
            raw: dict[str, Any] = fld(default_factory=dict, compare=False, repr=False)

            def describe(self) -> str:
                return f"{self.name} on {self.hosts}"

        made.append(Job)
    return made


@pytest.mark.parametrize("frozen", [True, False])
def test_a_record_is_built_compared_and_shown_as_a_dataclass_is(frozen: bool) -> None:
    std, rec = _pair(frozen)
    for make in (
        lambda c: c("train"),
        lambda c: c("train", 4, ["a"]),
        lambda c: c(name="train", raw={"x": 1}),
    ):
        a, b = make(std), make(rec)
        assert repr(a) == repr(b)
        assert dataclasses.asdict(a) == records.asdict(b)
        assert b == make(rec) and b != rec("other") and b.describe() == a.describe()
    assert rec("x", raw={"a": 1}) == rec("x", raw={"b": 2})  # compare=False
    assert rec("x").tags is not rec("x").tags  # a factory per instance
    assert records.replace(rec("x", 2), hosts=3) == rec("x", 3)


def test_frozen_records_hash_and_refuse_assignment_non_frozen_do_not_hash() -> None:
    _, frozen = _pair(True)
    _, plain = _pair(False)

    @records.dataclass(frozen=True)
    class Slot:
        host: str
        rank: int = 0

    @dataclasses.dataclass(frozen=True)
    class StdSlot:
        host: str
        rank: int = 0

    assert hash(Slot("a", 1)) == hash(Slot("a", 1)) == hash(StdSlot("a", 1))
    assert {Slot("a"), Slot("a"), Slot("b")} == {Slot("a"), Slot("b")}
    with pytest.raises(records.FrozenInstanceError):
        frozen("x").hosts = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        frozen("x").hosts = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(plain("x"))
    p = plain("x")
    p.hosts = 5
    assert p.hosts == 5


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c(),
        lambda c: c("a", 1, [], {}, "extra"),
        lambda c: c("a", name="b"),
        lambda c: c("a", nope=1),
    ],
)
def test_wrong_arguments_are_a_type_error_as_with_a_dataclass(call: Callable[[Any], Any]) -> None:
    std, rec = _pair(True)
    with pytest.raises(TypeError):
        call(std)
    with pytest.raises(TypeError):
        call(rec)


def test_post_init_runs_and_replace_falls_back_to_dataclasses() -> None:
    seen = []

    @records.dataclass
    class Checked:
        n: int

        def __post_init__(self) -> None:
            seen.append(self.n)

    Checked(3)
    assert seen == [3]

    @dataclasses.dataclass
    class Std:
        n: int

    assert records.replace(Std(1), n=2) == Std(2)


def test_what_records_do_not_do_is_refused_not_half_done() -> None:
    @records.dataclass
    class Base:
        a: int

    with pytest.raises(TypeError, match="records do not inherit fields"):

        @records.dataclass
        class Child(Base):
            b: int

    with pytest.raises(TypeError, match=r"Odd\.limit: records have no ClassVar"):

        @records.dataclass
        class Odd:
            limit: ClassVar[int] = 3
