"""Running where the users run: the accelerator extras resolve from the package index, and
--tpu on a machine without a TPU stops in one line that names what to install."""

import importlib.util
import json
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import REPO, tiny_config, write_config
from test_cli import run

INDEX = "https://pypi.org/simple/"
# Cloud TPU VMs, Colab and Kaggle run Ubuntu 22.04 (glibc 2.35) on x86_64. pip takes the platform
# tags literally, so every manylinux tag such a machine accepts is listed (JAX's wheels are _2_27).
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + ["manylinux2014_x86_64"]


def _index_reachable() -> str | None:
    """None when the index answers, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(INDEX + "pip/", method="HEAD"), timeout=15):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


# Python 3.11 is the oldest the project supports (a TPU VM's python3.11); 3.12 is Colab's, and
# JAX 0.11+ need it, so both ends of the `jax` range are resolved.
TARGETS = [("tpu", "3.11"), ("tpu", "3.12"), ("cuda", "3.11"), ("cuda", "3.12")]


def pip_dry_run(extra: str, python: str, report: Path) -> subprocess.Popen:
    """`pip install ".[extra]"` on such a machine, resolved but not installed; its report in `report`.

    The project's own dependencies go in beside the extra's, so a pin that conflicts with the
    `jax` range fails here. `--isolated` reads the index alone (no local mirror or constraints);
    `fast-deps` reads each wheel's metadata by HTTP range requests instead of downloading it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"][extra]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return subprocess.Popen(
        [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--use-feature=fast-deps", "--index-url", INDEX, "--only-binary", ":all:", *platform_args,
         "--python-version", python, "--target", str(report.parent / "never-written"), "--report", str(report),
         *requirements], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """{(extra, python): (returncode, {name: version}, stderr)}, the four resolved side by side
    (they wait on the network more than they compute)."""
    why = _index_reachable()
    if why:
        pytest.skip(f"the package index {INDEX} cannot be reached ({why}); resolving the extras needs it")
    import pip
    if Version(pip.__version__) < Version("25.1"):
        pytest.skip(f"pip {pip.__version__} downloads whole wheels (GBs for CUDA) to resolve; "
                    "the test extra asks for pip>=25.1")
    tmp = tmp_path_factory.mktemp("pip")
    reports = {target: tmp / f"{target[0]}-{target[1]}.json" for target in TARGETS}
    procs = {target: pip_dry_run(*target, reports[target]) for target in TARGETS}
    out = {}
    for target, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        installed = {}
        if proc.returncode == 0:
            installed = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                         for item in json.loads(reports[target].read_text())["install"]}
        out[target] = (proc.returncode, installed, stderr)
    return out


def _jax_range() -> SpecifierSet:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return SpecifierSet(next(d for d in deps if d.startswith("jax>") or d.startswith("jax="))[3:])


@pytest.mark.parametrize("extra, python", TARGETS)
def test_accelerator_extras_resolve_from_the_index(resolved, extra, python):
    returncode, installed, stderr = resolved[extra, python]
    assert returncode == 0, f"pip could not resolve .[{extra}] for Python {python}:\n{stderr[-3000:]}"
    assert Version(installed["jax"]) in _jax_range()
    # JAX's compiled half and the accelerator runtime come in the versions JAX itself pins.
    assert Version(installed["jaxlib"]).release[:2] == Version(installed["jax"]).release[:2]
    if extra == "tpu":
        assert "libtpu" in installed, sorted(installed)
    else:
        assert Version(installed["jax-cuda12-plugin"]) == Version(installed["jaxlib"])
        assert "nvidia-cudnn-cu12" in installed  # cuDNN's fused attention comes as a wheel, no system CUDA


# ----------------------------------------------------------------------------- --tpu without a TPU
@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tpu")
    return write_config(tmp / "tiny.json", tiny_config(tmp))


@pytest.mark.parametrize("command", [["main.py"], ["-m", "gpt2train", "train"]])
def test_tpu_flag_without_a_tpu_names_the_install_in_one_line(config, command):
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("JAX's TPU support is installed here: the other message applies")
    r = run(*command, "--model", str(config), "--tpu", "my-tpu", timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --tpu my-tpu") and "no TPU" in lines[0]
    assert 'pip install -e ".[tpu]"' in lines[0]
    assert not (config.parent / "model").exists()  # stopped before training anything


def test_tpu_flag_with_tpu_support_but_no_chip_says_where_to_run(monkeypatch):
    """JAX's TPU runtime installed on a machine without the chips (a VM of the wrong kind)."""
    from gpt2train.cli import check_tpu
    from gpt2train.errors import UserError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    with pytest.raises(UserError, match="TPU support is installed") as e:
        check_tpu("my-tpu")
    assert "run on the Cloud TPU VM itself" in str(e.value) and "pip install" not in str(e.value)
    check_tpu(None)  # no flag, no check


def test_tpu_flag_joins_the_tpu_vms_workers_through_jax(monkeypatch):
    """--tpu with JAX's TPU runtime installed calls jax.distributed.initialize() without arguments,
    which reads a Cloud TPU VM's workers from its metadata (no TPU here: JAX's call is stood in for)."""
    import jax
    from gpt2train import distributed
    from gpt2train.errors import UserError
    for name in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(distributed, "tpu_runtime_installed", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert distributed.initialize(tpu=True) is True and calls == [((), {})]
    assert distributed.initialize() is False and len(calls) == 1  # no --tpu and no cluster: one process

    def no_metadata(*a, **k):
        raise RuntimeError("Getting metadata['agent-worker-number'] failed for 6 tries\n(details)")
    monkeypatch.setattr(jax.distributed, "initialize", no_metadata)
    with pytest.raises(UserError, match=r"could not join this TPU VM's workers \(Getting metadata.*6 tries\)"):
        distributed.initialize(tpu=True)

    monkeypatch.setattr(distributed, "tpu_runtime_installed", lambda: False)  # CPU-only JAX: check_tpu explains
    assert distributed.initialize(tpu=True) is False
