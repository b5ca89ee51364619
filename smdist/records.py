"""``@dataclass`` for the agent's records, without the ``dataclasses`` module (issue 18).

The standard decorator writes each class's ``__init__``, ``__repr__``, ``__eq__``,
``__hash__`` and frozen ``__setattr__`` as source text and compiles it: about a millisecond
a class, and the agent defines some thirty before its first worker starts. Measured in
instructions (valgrind, which load does not disturb), the decorators were more than half of
a one-host agent's start-up, and ``dataclasses`` itself (with ``inspect``, ``ast``, ``dis``)
another tenth. Here those methods are written once and read the class's fields from a
tuple, so making a record costs a loop over its annotations.

What is kept: fields from the class's own annotations, in order; defaults,
``field(default=..., default_factory=..., repr=..., compare=...)``; ``frozen``;
``__post_init__``; ``__eq__`` and, when frozen, ``__hash__`` over the compared fields (a
non-frozen record is unhashable); a method the class defines itself is never replaced;
``asdict`` and ``replace``. Not kept: inheritance between records, ``ClassVar`` and
``InitVar`` annotations (both refused with a TypeError when the class is made), ``slots``,
``order``, ``kw_only`` (no record uses them). mypy sees
the standard ``dataclasses`` names, so a record is type-checked as a dataclass.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: this module exists for the start-up's sake
if TYPE_CHECKING:
    from dataclasses import FrozenInstanceError, asdict, dataclass, field, replace
else:
    _MISSING = object()

    class FrozenInstanceError(AttributeError):
        """Assigning to a field of a frozen record (as ``dataclasses``')."""

    class _Field:
        __slots__ = ("compare", "default", "factory", "name", "repr")

        def __init__(self, default, factory, repr_, compare):
            self.name = ""
            self.default, self.factory, self.repr, self.compare = default, factory, repr_, compare

    def field(*, default=_MISSING, default_factory=_MISSING, repr=True, compare=True):
        return _Field(default, default_factory, repr, compare)

    def dataclass(cls=None, /, *, frozen=False):
        def wrap(cls):
            return _make(cls, frozen)

        return wrap if cls is None else wrap(cls)

    def _make(cls, frozen):
        # What records do not do is refused, never half done (a standard dataclass would
        # take the base's fields or skip a ClassVar; a record would silently not).
        for base in cls.__mro__[1:]:
            if "__record_fields__" in base.__dict__ or "__dataclass_fields__" in base.__dict__:
                raise TypeError(
                    f"{cls.__qualname__}: records do not inherit fields (from "
                    f"{base.__qualname__}); use dataclasses.dataclass for this class"
                )
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
            if (
                str(annotation)
                .replace("typing.", "")
                .replace("dataclasses.", "")
                .startswith(("ClassVar", "InitVar"))
            ):
                raise TypeError(
                    f"{cls.__qualname__}.{name}: records have no ClassVar or InitVar "
                    "fields; use dataclasses.dataclass for this class"
                )
        fields = []
        # The class's own annotations (inspect.get_annotations would import inspect).
        for name in cls.__dict__.get("__annotations__", {}):  # noqa: RUF063
            value = cls.__dict__.get(name, _MISSING)
            f = value if isinstance(value, _Field) else _Field(value, _MISSING, True, True)
            f.name = name
            if f.default is _MISSING:
                if name in cls.__dict__:
                    delattr(cls, name)  # a default_factory's field: no class attribute
            else:
                setattr(cls, name, f.default)
            fields.append(f)
        cls.__record_fields__ = tuple(fields)
        cls.__record_compared__ = tuple(f.name for f in fields if f.compare)
        cls.__match_args__ = tuple(f.name for f in fields)
        own = cls.__dict__
        for name, method in (("__init__", _init), ("__repr__", _repr), ("__eq__", _eq)):
            if name not in own:
                setattr(cls, name, method)
        if "__hash__" not in own or own["__hash__"] is None:
            cls.__hash__ = _hash if frozen else None
        if frozen:
            cls.__setattr__ = _frozen
            cls.__delattr__ = _frozen
        return cls

    def _init(self, *args, **kwargs):
        cls = type(self)
        fields = cls.__record_fields__
        if len(args) > len(fields):
            raise TypeError(
                f"{cls.__qualname__}() takes {len(fields)} positional arguments "
                f"but {len(args)} were given"
            )
        put = object.__setattr__
        for f, value in zip(fields, args, strict=False):
            if f.name in kwargs:
                raise TypeError(f"{cls.__qualname__}() got multiple values for {f.name!r}")
            put(self, f.name, value)
        for f in fields[len(args) :]:
            if f.name in kwargs:
                value = kwargs.pop(f.name)
            elif f.default is not _MISSING:
                value = f.default
            elif f.factory is not _MISSING:
                value = f.factory()
            else:
                raise TypeError(f"{cls.__qualname__}() missing required argument {f.name!r}")
            put(self, f.name, value)
        if kwargs:
            raise TypeError(
                f"{cls.__qualname__}() got an unexpected argument {next(iter(kwargs))!r}"
            )
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def _repr(self):
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in type(self).__record_fields__ if f.repr
        )
        return f"{type(self).__qualname__}({shown})"

    def _key(self):
        return tuple(getattr(self, name) for name in type(self).__record_compared__)

    def _eq(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _key(self) == _key(other)

    def _hash(self):
        return hash(_key(self))

    def _frozen(self, name, value=None):
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def asdict(obj):
        """A record as a dict, records inside it too (lists, tuples and dicts followed)."""
        return _plain(obj)

    def _plain(obj):
        if hasattr(type(obj), "__record_fields__"):
            return {f.name: _plain(getattr(obj, f.name)) for f in type(obj).__record_fields__}
        if isinstance(obj, (list, tuple)):
            return type(obj)(_plain(v) for v in obj)
        if isinstance(obj, dict):
            return type(obj)((_plain(k), _plain(v)) for k, v in obj.items())
        if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
            return obj
        import copy

        return copy.deepcopy(obj)

    def replace(obj, /, **changes):
        """A copy of ``obj`` with ``changes`` (a record, or a standard dataclass)."""
        if not hasattr(type(obj), "__record_fields__"):
            import dataclasses

            return dataclasses.replace(obj, **changes)
        for f in type(obj).__record_fields__:
            changes.setdefault(f.name, getattr(obj, f.name))
        return type(obj)(**changes)


__all__ = ["FrozenInstanceError", "asdict", "dataclass", "field", "replace"]
