"""The fleet's Lua scripts: one ``.lua`` file per concept, composed and bound by name.

Why Lua and not a library: every decision here (take a lease, settle a delivery, park
a message, claim due work) must read and write several keys atomically against the
one clock every process shares (Redis ``TIME``) in a single round trip. No Python
library offers these combined state machines; a script is the only way to keep them
atomic without locks. Each concept's functions live in ``reliability/lua/<noun>.lua``;
a script is the prelude, the functions it uses and a short body.

Keys and arguments are bound **by name**: a body says ``@idem`` for a key and ``$owner``
for an argument, and :class:`Script` turns them into ``KEYS[i]`` / ``ARGV[j]`` and the
caller's mappings into the lists Redis takes — nothing depends on an offset kept in
sync by a comment. Guards add :class:`Fragment` s (admission checks, settle tails)
with names of their own, bound after the script's; inside a fragment ``@@`` / ``$$``
are its first key's / argument's offset, for loops over a variable number of parts.
``ARGV[1]`` is always ``now``: empty in production (Redis ``TIME``), a fixed number in
tests only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

_TOKEN = re.compile(r"@@|\$\$|([@$])([A-Za-z_][A-Za-z0-9_]*)")
# Where a base body takes its fragments' code (settle tails, admission checks, commits).
FRAGMENTS, COMMITS = "--[fragments]", "--[commits]"


@cache
def lua(name: str) -> str:
    """The source of ``reliability/lua/<name>.lua``."""
    return resources.files("reliability").joinpath(f"lua/{name}.lua").read_text()


def compose(*libraries: str, body: str) -> str:
    """The prelude, the named function libraries, then the body (positional KEYS/ARGV)."""
    return "\n".join([lua("prelude"), *(lua(n) for n in libraries), body])


@dataclass(frozen=True)
class Fragment:
    """A guard's piece of a script: named keys and arguments, code, and (admission only)
    commit code that runs once every check passed."""

    name: str
    libraries: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    code: str = ""
    commit: str = ""


@dataclass
class Part:
    """A fragment plus the values of its keys and arguments for one call, in order."""

    fragment: Fragment
    keys: Sequence[str] = ()
    args: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.fragment.keys) or len(self.args) != len(self.fragment.args):
            raise ValueError(f"fragment {self.fragment.name}: wrong number of keys/args")


def _bind(
    code: str,
    keys: Mapping[str, int],
    args: Mapping[str, int],
    key_base: int,
    arg_base: int,
    where: str,
) -> str:
    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "@@":
            return str(key_base)
        if token == "$$":
            return str(arg_base)
        sigil, name = match.group(1), match.group(2)
        table = keys if sigil == "@" else args
        if name not in table:
            raise KeyError(f"{where}: no {'key' if sigil == '@' else 'argument'} named {name!r}")
        return f"{'KEYS' if sigil == '@' else 'ARGV'}[{table[name]}]"

    return _TOKEN.sub(replace, code)


@dataclass(frozen=True)
class Script:
    """A Lua script with named keys and arguments, optionally extended by fragments."""

    libraries: tuple[str, ...]
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    fragments: tuple[Fragment, ...] = ()
    _source: list[str] = field(default_factory=list, compare=False, repr=False)

    def extended(self, fragments: tuple[Fragment, ...]) -> Script:
        """This script with ``fragments`` bound after its own keys and arguments."""
        return _extended(self, fragments)

    @property
    def source(self) -> str:
        if not self._source:
            self._source.append(self._build())
        return self._source[0]

    def _build(self) -> str:
        keys = {name: i + 1 for i, name in enumerate(self.keys)}
        args = {name: i + 2 for i, name in enumerate(self.args)}  # ARGV[1] is now
        key_base, arg_base = len(self.keys), len(self.args) + 1
        codes, commits = [], []
        libraries = list(self.libraries)
        for fragment in self.fragments:
            fkeys = {name: key_base + i + 1 for i, name in enumerate(fragment.keys)}
            fargs = {name: arg_base + i + 1 for i, name in enumerate(fragment.args)}
            where = f"fragment {fragment.name}"
            codes.append(
                f"-- {fragment.name}\n"
                + _bind(fragment.code, fkeys, fargs, key_base, arg_base, where)
            )
            if fragment.commit:
                commits.append(_bind(fragment.commit, fkeys, fargs, key_base, arg_base, where))
            libraries.extend(x for x in fragment.libraries if x not in libraries)
            key_base += len(fragment.keys)
            arg_base += len(fragment.args)
        body = _bind(self.body, keys, args, 0, 1, "script body")
        body = body.replace(FRAGMENTS, "\n".join(codes)).replace(COMMITS, "\n".join(commits))
        return compose(*dict.fromkeys(libraries), body=body)

    def layout(
        self,
        keys: Mapping[str, str],
        args: Mapping[str, Any],
        parts: Sequence[Part] = (),
        now: Any = "",
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV lists for one call: named values, then each part's, in the
        order of :attr:`fragments` (which ``parts`` must match)."""
        if tuple(p.fragment for p in parts) != self.fragments:
            raise ValueError("parts do not match the script's fragments")
        unknown = (set(keys) - set(self.keys)) | (set(args) - set(self.args))
        if unknown:
            raise KeyError(f"no key or argument named {sorted(unknown)}")
        key_list = [keys.get(name, "") for name in self.keys]
        arg_list: list[Any] = [now, *(args.get(name, "") for name in self.args)]
        for part in parts:
            key_list.extend(part.keys)
            arg_list.extend(part.args)
        return key_list, arg_list


@cache
def _extended(script: Script, fragments: tuple[Fragment, ...]) -> Script:
    return Script(
        script.libraries, script.keys, script.args, script.body, script.fragments + fragments
    )


def script(*libraries: str, keys: tuple[str, ...], args: tuple[str, ...], body: str) -> Script:
    """A named-binding script using the given ``.lua`` libraries."""
    return Script(libraries, keys, args, body)
