"""Lua scripts: loaded once at start-up, called by SHA, reloaded on NOSCRIPT exactly once."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from redis.exceptions import NoScriptError

_KEY_REF = re.compile(r"KEYS\[(\d+)\]")

Arg = str | bytes | int | float


class Executor(Protocol):
    async def execute_command(self, *args: Any, **options: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class LuaScript:
    """One script file: its source, SHA1 and the largest KEYS index its header comment declares."""

    name: str
    source: str
    sha: str
    max_keys: int

    @classmethod
    def from_source(cls, name: str, source: str) -> LuaScript:
        header = source.split("]]", 1)[0]
        indexes = [int(i) for i in _KEY_REF.findall(header)]
        sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        return cls(name, source, sha, max(indexes, default=0))

    async def __call__(
        self, client: Executor, keys: Sequence[str], args: Sequence[Arg] = ()
    ) -> Any:
        """EVALSHA; on NOSCRIPT (a restarted or flushed server) EVAL with the source, once.

        NOSCRIPT means the script did not run, so the retry can never apply it twice. EVAL,
        not SCRIPT LOAD then EVALSHA: a flush between those two failed the call (a 503 with
        Redis up, seen under load in tests/test_faults.py); EVAL runs the source it carries
        and caches it for the next EVALSHA.
        """
        if len(keys) > self.max_keys:
            raise ValueError(f"{self.name}: {len(keys)} keys, header declares {self.max_keys}")
        try:
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.execute_command("EVAL", self.source, len(keys), *keys, *args)


def _lua_dir() -> Path:
    packaged = resources.files("gateway") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "lua"


class ScriptRegistry:
    """All `lua/*.lua` files by stem, read once."""

    def __init__(self, directory: Path | None = None) -> None:
        base = directory or _lua_dir()
        self.scripts: dict[str, LuaScript] = {
            p.stem: LuaScript.from_source(p.stem, p.read_text(encoding="utf-8"))
            for p in sorted(base.glob("*.lua"))
        }
        if not self.scripts:
            raise RuntimeError(f"no Lua scripts found in {base}")

    def __getitem__(self, name: str) -> LuaScript:
        return self.scripts[name]

    async def load_all(self, client: Any) -> None:
        """SCRIPT LOAD every script (start-up fails fast on a script the server rejects); on a
        cluster, on every primary."""
        for script in self.scripts.values():
            sha = await client.script_load(script.source)
            if isinstance(sha, bytes):
                sha = sha.decode()
            if sha != script.sha:
                raise RuntimeError(f"{script.name}: server SHA {sha} != {script.sha}")

    async def loaded(self, client: Any) -> bool:
        """Every script is in the server's cache (on a cluster: in every primary's)."""
        shas = [s.sha for s in self.scripts.values()]
        found = await client.script_exists(*shas)
        return all(bool(x) for x in found)
