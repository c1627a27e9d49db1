"""Pinned environments: the versions a run must match, written by `splitvlm env --lock F`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from splitvlm.core.errors import SplitVLMError
from splitvlm.core.identity import environment
from splitvlm.core.profiles import LEGACY_TOWER_KERNELS

FORMAT = "splitvlm.lock/1"
LOCKED = ("splitvlm", "vllm", "torch", "transformers", "cuda", "device", "python")
ENTRY_FIELDS = {"vllm_version": "vllm", "torch_version": "torch", "device": "device"}  # entry metadata -> lock


def current() -> dict[str, str]:
    """The locked fields of this process's environment."""
    env = environment()
    return {name: env[name] for name in LOCKED}


def write_lock(path: str) -> dict:
    """Write this environment as a lock file; returns what was written."""
    lock = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": current()}
    try:
        Path(path).write_text(json.dumps(lock, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise SplitVLMError(f"{path}: cannot write the lock file ({exc.strerror or exc})") from None
    return lock


def read_lock(path: str) -> dict[str, str]:
    """The locked environment of a lock file; a hand-written one may lock fewer fields."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SplitVLMError(f"lock {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise SplitVLMError(f"lock {path}: not JSON ({exc.msg})") from None
    env = data.get("environment") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(env, dict):
        raise SplitVLMError(f"lock {path}: not a splitvlm lock file (write one with `splitvlm env --lock F`)")
    unknown = sorted(set(env) - set(LOCKED))
    if unknown:
        raise SplitVLMError(f"lock {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(LOCKED)}")
    if not all(isinstance(v, str) for v in env.values()):
        raise SplitVLMError(f"lock {path}: every value must be a string")
    return env


def differences(locked: dict[str, str], here: dict[str, str]) -> list[str]:
    """'name locked-value here here-value' for each locked field this environment does not match."""
    return [f"{name} {value} here {here.get(name, '?')}" for name, value in locked.items() if here.get(name) != value]


def check_lock(path: str) -> dict[str, str]:
    """The lock's environment, after refusing to run under any other (one line naming each field)."""
    locked = read_lock(path)
    diffs = differences(locked, current())
    if diffs:
        raise SplitVLMError(f"lock {path}: " + "; ".join(diffs))
    return locked


def entry_differences(locked: dict[str, str], meta: dict[str, str]) -> list[str]:
    """What a store entry's recorded environment says that the lock does not."""
    out = []
    for field, name in ENTRY_FIELDS.items():
        if name in locked and meta.get(field) != locked[name]:
            out.append(f"{name} {meta.get(field) or '(none)'}, lock {locked[name]}")
    return out


class EntryCheck:
    """Refuses store entries made under another environment than the lock's (or, without a lock,
    another vLLM version or device than this one), and exact-profile entries whose tower ran other
    attention kernels than `tower` (core.profiles.tower_kernels; None: not checked); with allow_mismatch,
    a lock or the tower warns once per entry."""

    def __init__(self, lock_path: str | None, allow_mismatch: bool, tower: str | None = None):
        self.lock_path = lock_path
        self.lock = check_lock(lock_path) if lock_path else None
        self.allow_mismatch = allow_mismatch
        self.tower = tower
        self.warned: set[str] = set()

    def _tower(self, key: str, meta: dict[str, str]) -> None:
        if self.tower is None or meta.get("profile") != "exact":
            return
        made = meta.get("tower_kernels") or LEGACY_TOWER_KERNELS  # entries from before the field: SDPA
        if made == self.tower:
            return
        message = f"{key}: encoded with tower attention {made}, this engine runs {self.tower}"
        if not self.allow_mismatch:
            raise SplitVLMError(f"{message}; outputs would not be exact (re-encode, or pass --allow-mismatch)")
        if "tower " + key not in self.warned:
            self.warned.add("tower " + key)
            print(f"warning: {message}; used anyway (--allow-mismatch)", file=sys.stderr)

    def __call__(self, key: str, meta: dict[str, str]) -> None:
        self._tower(key, meta)
        if self.lock is None:
            self._against_here(key, meta)
            return
        diffs = entry_differences(self.lock, meta)
        if not diffs:
            return
        message = f"{key}: made under {'; '.join(diffs)} (lock {self.lock_path})"
        if not self.allow_mismatch:
            raise SplitVLMError(f"{message}; outputs would not be exact (re-encode, or pass --allow-mismatch)")
        if key not in self.warned:
            self.warned.add(key)
            print(f"warning: {message}; used anyway (--allow-mismatch)", file=sys.stderr)

    def _against_here(self, key: str, meta: dict[str, str]) -> None:
        if self.allow_mismatch:
            return
        env = environment()
        made = (meta.get("vllm_version"), meta.get("device"))
        if made != (env["vllm"], env["device"]):
            raise SplitVLMError(
                f"{key}: encoded with vLLM {made[0]} on {made[1]}, decoding with vLLM "
                f"{env['vllm']} on {env['device']}; outputs would not be exact "
                "(re-encode, or pass --allow-mismatch)")
