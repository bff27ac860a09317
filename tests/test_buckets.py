"""gs:// and s3:// for real: encode records into a bucket, train from it, stop the run with SIGTERM
(a preemption), resume it, sample from it; a missing or refused bucket is one line. gs:// runs
against gcp-storage-emulator (with GCS's moveTo added: tests/gcs_emulator.py), s3:// against
moto's server, each started here on a free loopback port and stopped after the module. gcsfs finds the GCS emulator through STORAGE_EMULATOR_HOST;
s3fs reads AWS_ENDPOINT_URL.

Checkpoints stay local here. TensorStore (Orbax's writer) can be pointed at a GCS emulator
(TENSORSTORE_GCS_HTTP_URL), but gcp-storage-emulator sends no x-goog-generation header and ignores
generation preconditions, so TensorStore's first rewrite of a checkpoint's OCDBT manifest fails
("Malformed StorageGeneration"); test_checkpoints_in_the_emulator_go_as_far_as_it_allows shows how
far it gets. Orbax 0.12 cannot write to s3:// at all, so model_path refuses it in one line.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ENCODER_DIR, REPO, STDLIB, tiny_config
from test_cli import write_config

pytest.importorskip("gcsfs")
pytest.importorskip("s3fs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the emulator exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


def start(command, env=None):
    port = free_port()
    process = subprocess.Popen([*command(port)], env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}"


def stop(process):
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def gcs_store():
    emulator = [sys.executable, str(Path(__file__).with_name("gcs_emulator.py"))]  # with GCS's moveTo (see there)
    process, url = start(lambda port: [*emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                                       "-q"])
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup (metadata server)
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC probe of the bucket type (TLS only)
           "NO_GCE_CHECK": "true"}
    from gcsfs.core import GCSFileSystem  # the plain one: the env above does not reach this process
    fs = GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True)
    return process, env, fs


def s3_store():
    process, url = start(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs
    fs = s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True)
    return process, env, fs


@pytest.fixture(scope="module", params=["gs", "s3"])
def store(request):
    process, env, fs = {"gs": gcs_store, "s3": s3_store}[request.param]()
    fs.mkdir("bucket")
    yield request.param, env, fs
    stop(process)


def run(env, *args, timeout=300):
    full = {**os.environ, **env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def local_steps(tmp_path) -> list[int]:
    directory = tmp_path / "model" / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_encode_train_kill_resume_and_sample_in_a_bucket(store, tmp_path):
    scheme, env, fs = store
    data = f"{scheme}://bucket/data"
    encoded = run(env, "-m", "gpt2train", "encode", "--input", str(STDLIB / "json" / "*.py"), "--out", data,
                  "--name", "py", "--encoder_path", str(ENCODER_DIR), "--files_per", "2", "--minimum_size", "16",
                  "--workers", "0")
    assert encoded.returncode == 0, encoded.stderr
    assert len(fs.glob("bucket/data/py_*.tfrecords")) >= 2

    cfg = tiny_config(tmp_path, input="tfrecords", data_path=data, eval_data_path=None, eval_steps=0, stitch=2,
                      max_steps=10**6, train_steps=10**6, checkpoint_every=2, iterations=1,
                      predict_path=str(tmp_path / "samples.txt"))
    config = write_config(tmp_path / "bucket.json", cfg)
    env_run = {**os.environ, **env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    training = subprocess.Popen([sys.executable, "main.py", "--model", str(config)], cwd=REPO, env=env_run,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not local_steps(tmp_path) and training.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert training.poll() is None, training.stderr.read()
        assert local_steps(tmp_path), "no checkpoint after 300 s"
    finally:
        training.send_signal(signal.SIGTERM)  # as a preemption does: the run saves its step and exits
        _, stderr = training.communicate(timeout=300)
    assert training.returncode != 0 and "checkpoint saved" in stderr, stderr[-2000:]
    latest = local_steps(tmp_path)[-1]

    resumed = run(env, "main.py", "--model", str(config), "--max_steps", str(latest + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {latest}" in resumed.stdout + resumed.stderr
    assert local_steps(tmp_path)[-1] == latest + 2

    sampled = run(env, "main.py", "--model", str(config), "--predict_text", "import json", "--length", "5")
    assert sampled.returncode == 0, sampled.stderr
    assert "SAMPLE 0" in sampled.stdout


def test_a_missing_bucket_is_one_line(store, tmp_path):
    scheme, env, _ = store
    cfg = tiny_config(tmp_path, input="tfrecords", data_path=f"{scheme}://no-such-bucket/data", eval_steps=0)
    missing = run(env, "main.py", "--model", str(write_config(tmp_path / "missing.json", cfg)))
    assert missing.returncode == 2, missing.stderr
    assert f"the bucket {scheme}://no-such-bucket does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    data = run(env, "-m", "gpt2train", "encode", "--input", str(STDLIB / "json" / "*.py"), "--out",
               f"{scheme}://no-such-bucket/out", "--name", "x", "--encoder_path", str(ENCODER_DIR), "--workers", "0")
    assert data.returncode == 2 and f"the bucket {scheme}://no-such-bucket does not exist" in data.stderr


def test_a_refused_bucket_is_one_line(tmp_path):
    """moto with authentication on refuses keys it does not know (403), as S3 does."""
    process, url = start(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "unknown", "AWS_SECRET_ACCESS_KEY": "unknown",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
        cfg = tiny_config(tmp_path, input="tfrecords", data_path="s3://private/data", eval_steps=0)
        refused = run(env, "main.py", "--model", str(write_config(tmp_path / "refused.json", cfg)))
        out = run(env, "-m", "gpt2train", "encode", "--input", str(STDLIB / "json" / "*.py"), "--out",
                  "s3://private/out", "--name", "x", "--encoder_path", str(ENCODER_DIR), "--workers", "0")
    finally:
        stop(process)
    for result in (refused, out):
        assert result.returncode == 2, result.stderr
        assert "s3://private" in result.stderr and "denied" in result.stderr and "Traceback" not in result.stderr


def test_checkpoints_in_the_emulator_go_as_far_as_it_allows(tmp_path):
    """TensorStore follows TENSORSTORE_GCS_HTTP_URL: a small Orbax checkpoint is written to the
    emulator's bucket and read back; a whole train state is not (see the module doc)."""
    process, env, fs = gcs_store()
    try:
        fs.mkdir("bucket")
        code = (
            "import jax.numpy as jnp\n"
            "from gpt2train.checkpoint import Checkpointer\n"
            "from gpt2train.config import Config\n"
            "ckpt = Checkpointer(Config(model_path='gs://bucket/run'))\n"
            "ckpt.save(3, {'w': jnp.arange(6.0)}, {'batches': 3})\n"
            "ckpt.wait()\n"
            "state, meta = ckpt.restore({'w': jnp.zeros(6)}, 3)\n"
            "print(ckpt.latest_step(), meta['data'], ckpt.verified(3), state['w'].tolist())\n"
            "ckpt.close()\n")
        result = run(env, "-c", code)
    finally:
        stop(process)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "3 {'batches': 3} True [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]"
