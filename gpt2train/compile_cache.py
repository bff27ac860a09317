"""A persistent cache of compiled programs: a resumed run, a `generate`, an `evaluate` or a
`serve` start loads what XLA compiled before instead of compiling it again (the 124M training
step on CPU: 10.5 s to compile, 2.4 s from the cache).

On by default in ~/.cache/gpt2train/xla (or $XDG_CACHE_HOME/gpt2train/xla), at most 4 GiB,
least recently used entries evicted first. GPT2TRAIN_COMPILE_CACHE=DIR picks another
directory, GPT2TRAIN_COMPILE_CACHE=off turns it off; JAX_COMPILATION_CACHE_DIR, when set,
is left to JAX.

The cache holds native code that JAX loads and runs, so the folder must belong to the user who
runs the program (or root) and be writable by no one else: a world- or group-writable folder,
or one owned by another user, is refused (anyone who can write there could run code as you).
"""

from __future__ import annotations

import os
import stat
import warnings

from .errors import UserError

ENV = "GPT2TRAIN_COMPILE_CACHE"
MAX_BYTES = 4 << 30
MIN_COMPILE_SECONDS = 0.5  # programs that compile faster are not worth a file


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2train", "xla")


def enable() -> str | None:
    """Turn the cache on (see the module's doc); return its directory, or None when off."""
    import jax
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    if jax.config.jax_compilation_cache_dir:  # the user's own JAX setting
        return jax.config.jax_compilation_cache_dir
    path = os.path.expanduser(setting) if setting else default_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # e.g. a read-only home: run without the cache, say so once
        warnings.warn(f"compilation cache off: cannot create {path} ({e.strerror}); "
                      f"set {ENV}=DIR to a writable directory, or {ENV}=off")
        return None
    check_private(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def check_private(path: str) -> None:
    """Refuse a cache folder that someone other than this user (or root) can write to."""
    info = os.stat(path)
    others = info.st_mode & (stat.S_IWOTH | stat.S_IWGRP)
    if others or info.st_uid not in (os.getuid(), 0):
        who = "other users can write to it" if others else f"it belongs to another user (uid {info.st_uid})"
        raise UserError(f"the compilation cache {path} holds native code this program runs, and {who}: "
                        f"run chmod go-w {path} (and own it), or set {ENV}=DIR to a folder of your own, or {ENV}=off")
