"""What a configuration key allows, in words: ``ConfigError`` messages and the reference.

msgspec validates the whole tree (``config._build``); its error says only where
(``... - at `$.model.n_ctx```).  ``explain`` turns it into a ``ConfigError`` naming the
file, the section and the key, and what is allowed, written from the key's
annotation (``Annotated[int, Meta(ge=..., le=..., description=...)]`` or a
``Literal``) and the raw value.  ``reference`` lists every key with its default and
its description: the README's configuration reference (``tools/config_doc.py``).

The functions take the tree's root Struct (``config.Config``): its Struct-typed
fields are the sections, its ``models`` field (a tuple of Structs) the
``[[models]]`` entries.
"""
# No ``from __future__ import annotations``: see common/config_sections.py.

import re
from functools import cache
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin

import msgspec
from msgspec import Meta


class ConfigError(ValueError):
    """A configuration file is unreadable or one of its values is invalid."""


class Key(msgspec.Struct, frozen=True):
    """What one key allows, read from its annotation: the messages and the reference."""
    kind: type                      # bool, int, float, str, or tuple (a list of strings)
    lo: float | None
    hi: float | None
    choices: tuple[str, ...] | None
    default: Any
    doc: str
    pattern: str | None = None


def _struct_keys(name: str, struct: type) -> dict[str, Key]:
    keys = {}
    for f in msgspec.structs.fields(struct):
        base, *extras = get_args(f.type) if get_origin(f.type) is Annotated else (f.type,)
        meta = next((m for m in extras if isinstance(m, Meta)), Meta())
        choices = get_args(base) if get_origin(base) is Literal else None
        kind = str if choices else tuple if get_origin(base) is tuple else base
        if kind not in (bool, int, float, str, tuple) or meta.gt is not None \
                or meta.lt is not None \
                or choices and not all(isinstance(c, str) for c in choices):
            raise TypeError(f"[{name}] {f.name}: unsupported config type {f.type}")
        keys[f.name] = Key(kind, meta.ge, meta.le, choices, f.default, meta.description or "",
                           meta.pattern)
    return keys


@cache
def keys(root: type) -> dict[str, dict[str, Key]]:
    """section -> key -> Key, in declaration order (built on first use, not at import)."""
    sections: dict[str, dict[str, Key]] = {}
    for sec in msgspec.structs.fields(root):
        if not (isinstance(sec.type, type) and issubclass(sec.type, msgspec.Struct)):
            continue                                    # models, source
        sections[sec.name] = _struct_keys(sec.name, sec.type)
    return sections


ARRAYS = ("models", "tenants")         # the arrays of tables: [[models]], [[tenants]]


@cache
def entry_keys(root: type, array: str = "models") -> dict[str, Key]:
    """The keys of an entry of ``array`` ([[models]], [[tenants]])."""
    field = next(f for f in msgspec.structs.fields(root) if f.name == array)
    return _struct_keys(f"[{array}]", get_args(field.type)[0])


def unknown_section(source: str, name: str, root: type) -> ConfigError:
    return ConfigError(f"{source}: unknown section [{name}] (known: "
                       f"{', '.join(keys(root))}, {', '.join(f'[[{a}]]' for a in ARRAYS)})")


def _check_value(where: str, key: Key, value: Any) -> None:
    """Raise the ConfigError for ``value`` if ``key`` does not allow it."""
    if key.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif key.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif key.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            pass                                        # a huge int: out of range below
    elif key.kind is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    lo, hi = key.lo, key.hi
    if lo is not None and not value >= lo or hi is not None and not value <= hi:   # nan too
        raise ConfigError(f"{where}: {value!r} is out of range [{lo}, {hi}]")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(key.choices)}")
    if key.pattern and not re.match(key.pattern, value):
        raise ConfigError(f"{where}: {value!r} is not a valid name (letters, digits and "
                          "._:/- ; it starts with a letter or digit)")


def explain(exc: msgspec.ValidationError, raw: Mapping[str, Any], source: str,
            root: type) -> ConfigError:
    """msgspec's error (``... - at `$.model.n_ctx```) as a ConfigError naming section and key.

    Only the path is taken from msgspec; the message is written from the key's
    annotation and the raw value, as ``_check_value`` words it.
    """
    text, sep, path = str(exc).rpartition(" - at `")
    if not sep:
        text, path = str(exc), "$"
    parts = path.rstrip("`").split(".")[1:]
    sections = keys(root)
    array = parts[0].partition("[")[0] if parts else ""
    if array in ARRAYS:
        return _explain_entry(text, parts, raw, source, entry_keys(root, array), array)
    if not parts:
        for name in raw:
            if name not in sections:
                return unknown_section(source, name, root)
    elif parts[0] in sections and parts[0] in raw:
        name, table = parts[0], raw[parts[0]]
        if not isinstance(table, Mapping):
            return ConfigError(f"{source}: [{name}] must be a table")
        known = sections[name]
        if len(parts) == 1:
            for key in table:
                if key not in known:
                    return ConfigError(f"{source}: unknown key [{name}] {key} "
                                       f"(known: {', '.join(known)})")
        elif len(parts) == 2 and parts[1] in known and parts[1] in table:
            try:
                _check_value(f"{source}: [{name}] {parts[1]}", known[parts[1]], table[parts[1]])
            except ConfigError as err:
                return err
        where = f"[{name}]" if len(parts) == 1 else f"[{name}] {'.'.join(parts[1:])}"
        return ConfigError(f"{source}: {where}: {text}")
    return ConfigError(f"{source}: {text}")


def _explain_entry(text: str, parts: list[str], raw: Mapping[str, Any], source: str,
                   known: dict[str, Key], array: str) -> ConfigError:
    """An error inside ``[[models]]`` / ``[[tenants]]``: name the entry (number and name)
    and the key."""
    entries = raw.get(array)
    head, _, idx = parts[0].partition("[")
    if not isinstance(entries, list):
        return ConfigError(f"{source}: [[{array}]] must be an array of tables "
                           f"([[{array}]] entries)")
    if not idx:
        return ConfigError(f"{source}: [[{array}]]: {text}")
    i = int(idx.rstrip("]"))
    entry = entries[i] if i < len(entries) else None
    if not isinstance(entry, Mapping):
        return ConfigError(f"{source}: [[{array}]] entry {i + 1} must be a table")
    name = entry.get("name")
    where = f"{source}: [[{array}]] entry {i + 1}" + (f" ({name!r})" if isinstance(name, str)
                                                      else "")
    for key in entry:
        if key not in known:
            return ConfigError(f"{where}: unknown key {key} (known: {', '.join(known)})")
    if len(parts) == 1:
        missing = [k for k, v in known.items() if v.default is msgspec.NODEFAULT
                   and k not in entry]
        if missing:
            return ConfigError(f"{where}: {missing[0]} is required")
        return ConfigError(f"{where}: {text}")
    key = parts[1]
    if key in known and key in entry:
        try:
            _check_value(f"{where} {key}", known[key], entry[key])
        except ConfigError as err:
            return err
    return ConfigError(f"{where} {key}: {text}")


def reference(root: type) -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: the README's config reference
    (``[[models]]`` for the keys of a models entry; a required key's default is None)."""
    out = [(name, key, k.default, k.doc)
           for name, section in keys(root).items() for key, k in section.items()]
    out += [(f"[{array}]", key, None if k.default is msgspec.NODEFAULT else k.default, k.doc)
            for array in ARRAYS for key, k in entry_keys(root, array).items()]
    return out
