"""notebooks/finetune.ipynb, run end to end in a real kernel on CPU in its tiny setting: a 2-layer
model on GPT-2's vocabulary trained from scratch on a few standard-library modules (no network)."""

import base64
import io
import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "finetune.ipynb"
PROMPT = "def loads("
STEPS = 20


def _with_parameters(nb, values: dict):
    """Papermill's convention: a cell of new values right after the one tagged `parameters`."""
    at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def _outputs(nb, kind: str) -> list:
    """Every output of the executed notebook carrying `kind` ('text' for streams and text/plain)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text":
                text = out.get("text") or out.get("data", {}).get("text/plain")
                if text:
                    found.append(text)
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebook")
    nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), {
        "source": "",  # gpt2train is installed in this environment already
        "model": "tiny", "text_url": "", "text_file": "", "steps": STEPS, "prompt": PROMPT,
        "work": str(work / "finetune")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_PLATFORMS", "cpu")  # the kernel and the commands it starts inherit it
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(work)}}).execute()
    return nb, work / "finetune"


def test_the_notebook_trains_from_its_parameters(executed):
    nb, work = executed
    assert "cpu" in "".join(_outputs(nb, "text"))  # it found the CPU and sized the batch for it
    config = json.loads((work / "run.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_ctx"], config["max_steps"]) == (2, 64, 64, STEPS)
    lines = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {x["step"]: x["loss"] for x in lines if "loss" in x}
    evals = {x["step"]: x["eval_loss"] for x in lines if "eval_loss" in x}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5  # from ~10.8 nats (a uniform guess over 50257 tokens) down
    assert sorted(evals) == [4, 8, 12, 16, 20] and evals[20] < evals[4]


def test_the_notebook_shows_the_training_curve(executed):
    import matplotlib.image
    nb, work = executed
    images = _outputs(nb, "image/png")
    assert len(images) == 1
    png = base64.b64decode(images[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = matplotlib.image.imread(io.BytesIO(png))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400  # a real figure, not a placeholder
    assert pixels[..., :3].std() > 0.05  # with lines on it
    assert (work / "curves.png").exists()


def test_the_notebook_samples_and_exports(executed):
    nb, work = executed
    text = "".join(_outputs(nb, "text"))
    assert "SAMPLE 0 " in text
    sample = text.split("SAMPLE 0 ", 1)[1].split("\n", 1)[1].split("=" * 80)[0]
    assert len(sample.strip()) > 10  # the continuation of PROMPT (the seed's format prints it alone)
    assert sample in (work / "run" / "samples.txt").read_text()
    assert {"config.json", "model.safetensors"} <= {p.name for p in (work / "export").iterdir()}
    assert "transformers, greedy: " + PROMPT in text  # the export loads in Hugging Face transformers
