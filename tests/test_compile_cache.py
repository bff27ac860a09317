"""The commands' persistent compilation cache: where it goes, how it is turned off, and that a
second run loads its programs from it and computes the same."""

import json
import os
import subprocess
import sys

from conftest import REPO, tiny_config, write_config

PROBE = ("import warnings, jax; from gpt2train import compile_cache\n"
         "with warnings.catch_warnings(record=True) as w:\n"
         "    warnings.simplefilter('always'); got = compile_cache.enable()\n"
         "print(repr(got), repr(jax.config.jax_compilation_cache_dir), [str(x.message) for x in w])")


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GPT2TRAIN_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**base, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_where_the_cache_goes_and_how_it_is_turned_off(tmp_path):
    assert probe(GPT2TRAIN_COMPILE_CACHE=str(tmp_path / "c")) == f"'{tmp_path}/c' '{tmp_path}/c' []"
    assert (tmp_path / "c").is_dir()
    assert probe(GPT2TRAIN_COMPILE_CACHE="off") == "None None []"
    assert probe(XDG_CACHE_HOME=str(tmp_path / "xdg")) == f"'{tmp_path}/xdg/gpt2train/xla' '{tmp_path}/xdg/gpt2train/xla' []"
    assert probe(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "j")) == f"'{tmp_path}/j' '{tmp_path}/j' []"
    (tmp_path / "file").write_text("")
    out = probe(GPT2TRAIN_COMPILE_CACHE=str(tmp_path / "file" / "c"))
    assert out.startswith("None None") and "compilation cache off: cannot create" in out


def test_a_second_run_loads_the_programs_and_computes_the_same(tmp_path):
    cache = tmp_path / "cache"
    cfg = tiny_config(tmp_path, max_steps=4, train_steps=2, iterations=1)
    path = write_config(tmp_path / "tiny.json", cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "GPT2TRAIN_COMPILE_CACHE": str(cache)}
    train = subprocess.run([sys.executable, "main.py", "--model", str(path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    entries = {p.name for p in cache.iterdir() if p.name.endswith("-cache")}
    assert any(name.startswith("jit_step-") for name in entries), entries  # the training step

    def evaluate():
        r = subprocess.run([sys.executable, "-m", "gpt2train", "evaluate", "--model", str(path), "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])
    first = evaluate()
    stored = {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name.endswith("-cache")}
    assert evaluate() == first
    # Every program stored by the first run was loaded, not compiled and written again. (A program
    # that compiled just under the 0.5 s threshold the first time may cross it on a loaded machine
    # and be stored the second time: new entries are allowed, changed ones are not.)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name in stored} == stored
