"""The example notebooks: committed without outputs, and run top to bottom in a real Jupyter kernel (this Python,
this checkout) at small settings injected after their ``parameters`` cell, papermill-style.

Each run appends one cell that prints a JSON report of the notebook's variables, so the tests check what the
notebook computed, not only that it ran. Notebooks must write only where their parameters say (temporary folders
here): never into the repository nor their working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from hub_server import HubServer
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GATES = EXAMPLES / "gates" / "smollm2-135m-8k"
NOTEBOOKS = (
    "distillation.ipynb",
    "kernel_speed.ipynb",
    "quickstart.ipynb",
    "save_push_load.ipynb",
    "sparse_decoding.ipynb",
)
REPORT_MARKER = "NOTEBOOK-REPORT "


@pytest.fixture(scope="module", autouse=True)
def python3_kernel_is_this_python(tmp_path_factory):
    """Kernel name ``python3`` resolves to a spec written for this interpreter (``sys.executable -m
    ipykernel_launcher``), found first through ``JUPYTER_PATH``: a ``python3`` spec of another Python in the user's
    or the system's Jupyter folders cannot take its place."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3", overrides={"display_name": "Python 3 (the tests' Python)"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", os.pathsep.join([str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
        yield


def kernel_env(tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    """The kernel's environment: this checkout first on the path, an empty Hugging Face home, the inline plot
    backend (``MPLBACKEND`` unset), one intra-op thread unless ``OMP_NUM_THREADS`` says otherwise (the notebooks'
    tiny forwards gain little from more, and on a CPU shared with other jobs two spinning OpenMP threads made them
    5-7x slower); ``overrides`` set variables, ``None`` removes one."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env.pop("MPLBACKEND", None)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _parameters_cell_index(nb: nbformat.NotebookNode) -> int:
    indices = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(indices) == 1, f"expected one cell tagged 'parameters', found {len(indices)}"
    return indices[0]


def _repo_status() -> str | None:
    """``git status`` of the checkout (ignored files excluded), or None outside a git checkout."""
    if shutil.which("git") is None:
        return None
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout if done.returncode == 0 else None


def execute(nb: nbformat.NotebookNode, tmp_path: Path, env: dict[str, str] | None = None) -> Path:
    """Run ``nb`` in place in a fresh ``python3`` kernel whose working directory is an empty folder; returns it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env or kernel_env(tmp_path))
    return cwd


def run_notebook(
    name: str, tmp_path: Path, parameters: dict[str, Any], report: str, env: dict[str, str] | None = None
) -> tuple[nbformat.NotebookNode, dict[str, Any]]:
    """Execute ``examples/<name>`` with ``parameters`` injected after its parameters cell; return the executed
    notebook and the JSON of the expression ``report`` evaluated at its end."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    injected = new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_cell_index(nb) + 1, injected)
    nb.cells.append(new_code_cell(f"import json\nprint({REPORT_MARKER!r} + json.dumps({report}, default=str))"))
    before = _repo_status()
    cwd = execute(nb, tmp_path, env)
    assert _repo_status() == before, f"{name} wrote into the repository"
    assert not list(cwd.iterdir()), f"{name} wrote into its working directory: {list(cwd.iterdir())}"
    return nb, json.loads(_stdout(nb.cells[-1]).split(REPORT_MARKER, 1)[1])


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(out["text"] for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def images(nb: nbformat.NotebookNode) -> int:
    """PNG images the notebook displayed."""
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "display_data"
    )


# ----------------------------------------------------------------------------------------------------------------------
# The committed files
# ----------------------------------------------------------------------------------------------------------------------


def test_the_examples_are_these_notebooks_and_the_readme_lists_them():
    assert tuple(sorted(p.name for p in EXAMPLES.glob("*.ipynb"))) == NOTEBOOKS
    readme = (ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        assert f"examples/{name}" in readme, name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} have outputs or execution counts; clear them before committing"
    assert "widgets" not in nb.metadata
    assert nb.metadata.kernelspec.name == "python3"
    # the parameters cell comes before any other code, so injected values apply to everything
    assert nb.cells[_parameters_cell_index(nb)] is code[0]


def test_the_kernel_is_this_python_and_this_checkout(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]
    nb = new_notebook(cells=[new_code_cell("import sys\n\nimport seer_adapter\n\nprint(sys.executable)\n"
                                           "print(seer_adapter.__file__)")])  # fmt: skip
    execute(nb, tmp_path)
    executable, package = _stdout(nb.cells[0]).split("\n")[:2]
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(package).resolve() == (ROOT / "seer_adapter" / "__init__.py").resolve()


# ----------------------------------------------------------------------------------------------------------------------
# Running them (SmolLM2 from the seer_adapter cache, CPU, tiny settings)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart(tmp_path):
    nb, report = run_notebook(
        "quickstart.ipynb",
        tmp_path,
        {
            "prompt_tokens": 200,
            "max_new_tokens": 3,
            "ppl_tokens": 512,
            "dense_below_length": 256,
            "gates": str(GATES),
            "plot_layer": 15,
            "plot_head": 2,
            "device": "cpu",
        },
        '{"modes": [s["mode"] for s in stats], "density": density, "dense_ppl": dense_ppl, "sparse_ppl": sparse_ppl,'
        ' "threshold_density": threshold_density, "answer": answer, "kept": list(maps.kept.shape),'
        ' "layer": maps.layer, "base": type(base).__name__}',
    )
    assert report["modes"] == ["sparse"] * 30
    assert 0 < report["density"] < 0.9 and report["threshold_density"] != report["density"]
    assert report["dense_ppl"] < report["sparse_ppl"] < 2 * report["dense_ppl"]
    assert report["answer"].strip()
    assert report["kept"] == [9, 8, 8] and report["layer"] == 15  # 9 query heads, 512 tokens = 8 blocks
    assert report["base"] == "LlamaForCausalLM"  # unloaded at the end
    assert images(nb) == 2  # per-layer density, gate map


@pytest.mark.slow
def test_distillation(tmp_path):
    output = tmp_path / "gates"
    nb, report = run_notebook(
        "distillation.ipynb",
        tmp_path,
        {
            "seq_len": 256,
            "max_steps": 3,
            "warmup_steps": 1,
            "eval_tokens": 256,
            "output_dir": str(output),
            "device": "cpu",
        },
        '{"steps": [r["step"] for r in records], "losses": [r["loss"] for r in records],'
        ' "before": heldout_before.item(), "after": heldout_after.item(),'
        ' "method": model.peft_config["default"].sparsity_method}',
    )
    assert report["steps"] == [1, 2, 3]
    assert report["before"] != report["after"]  # the gates were trained
    assert report["method"] == "threshold"  # reloaded from output_dir with a setting changed at load
    assert {"adapter_config.json", "adapter_model.safetensors", "log.jsonl"} <= {p.name for p in output.iterdir()}
    logged = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert logged == report["losses"]
    assert images(nb) == 1  # the loss curve


@pytest.mark.slow
def test_sparse_decoding(tmp_path):
    output = tmp_path / "gates"
    nb, report = run_notebook(
        "sparse_decoding.ipynb",
        tmp_path,
        {
            "prompt_tokens": 256,
            "decode_tokens": 8,
            "budgets": (192,),
            "max_new_tokens": 4,
            "train_steps": 2,
            "seq_len": 256,
            "output_dir": str(output),
            "device": "cpu",
        },
        '{"density": decode_density, "untrained": [[r["selector"], r["decode_density"]] for r in rows_untrained],'
        ' "trained": [r["selector"] for r in rows_trained], "steps": [r["step"] for r in records],'
        ' "decode_gate": reloaded.decode_gate, "method": reloaded.decode_method, "new": sparse_ids.shape[1] - 256,'
        ' "static_same": static_same, "layers": [r["selector"] for r in rows_layers],'
        ' "layer_density": layer_density}',
    )
    assert report["density"] == pytest.approx(12 / 17)  # 12 of 17 blocks of 16 at the last step (260 slots, budget 192)
    assert [s for s, _ in report["untrained"]] == ["dense", "gate", "oracle", "oracle_mass", "moba"]
    assert all(0 < density < 1 for _, density in report["untrained"][1:])
    assert report["trained"] == ["dense", "gate"] and report["steps"] == [1, 2]
    assert report["decode_gate"] is True and report["method"] == "threshold" and report["new"] == 4
    assert report["static_same"] is True  # SeerStaticCache decodes the same tokens (static steps, eager on the CPU)
    # per-layer budgets: the two overridden layers (budget 384 > the 263-slot context) keep every block, the others not
    density = {int(layer): value for layer, value in report["layer_density"].items()}
    assert report["layers"] == ["dense", "gate"] and density[20] == density[23] == 1.0 and density[0] < 1.0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in output.iterdir()}


@pytest.mark.slow
def test_save_push_load_against_a_loopback_hub(tmp_path):
    token, repo = "hf_notebook_write_token", "alice/smollm2-seer-gates"
    env = kernel_env(
        tmp_path,
        HF_HUB_DISABLE_XET="1",  # the test server speaks LFS, not Xet
        HF_HUB_OFFLINE=None,  # CI sets it for the whole run
        TRANSFORMERS_OFFLINE=None,
        HF_TOKEN=None,
        HUGGING_FACE_HUB_TOKEN=None,
    )
    with HubServer({token: "alice"}) as hub:
        nb, report = run_notebook(
            "save_push_load.ipynb",
            tmp_path,
            {
                "repo_id": repo,
                "token": token,
                "hub_endpoint": hub.url,
                "gates": str(GATES),
                "work_dir": str(tmp_path / "share"),
                "check_tokens": 128,
            },
            '{"commit": commit.oid, "reload": same_after_reload, "peft": same_through_peft, "hub": same_from_hub,'
            ' "card_library": card.data.library_name}',
            env=env,
        )
        assert report["reload"] and report["peft"] and report["hub"]
        assert hub.head(repo) == report["commit"] and hub.repos[repo].private
        saved = tmp_path / "share" / "smollm2-gates"
        assert hub.file(repo, "adapter_model.safetensors") == (saved / "adapter_model.safetensors").read_bytes()
        assert sorted(hub.repos[repo].commits[report["commit"]].files) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
    assert report["card_library"] == "peft"
    assert (tmp_path / "hf_home" / "hub" / "models--alice--smollm2-seer-gates").is_dir()  # pulled into the cache


def test_kernel_speed(tmp_path):
    results = sorted((ROOT / "benchmarks" / "results").glob("bench_kernels*.json"))
    nb, report = run_notebook(
        "kernel_speed.ipynb",
        tmp_path,
        {
            "results_glob": str(ROOT / "benchmarks" / "results" / "bench_kernels*.json"),
            "local_seq_lens": [128, 320],
            "local_densities": [0.5, 1.0],
            "local_heads": (2, 1),
            "local_head_dim": 16,
            "output_dir": str(tmp_path / "bench"),
            "device": "cpu",
        },
        '{"files": files, "backend": local["meta"]["backend"], "checks": local["meta"]["checks"]}',
    )
    assert report["files"] == [str(p) for p in results] and results
    assert report["backend"] == "reference" and all(check["passed"] for check in report["checks"])
    local = json.loads((tmp_path / "bench" / "bench_local.json").read_text())
    assert [(row["kernel"], row["S"]) for row in local["rows"]] == [
        (kernel, seq_len) for seq_len in (128, 320) for kernel in ("sdpa_dense", "seer_reference", "seer_reference")
    ]
    assert images(nb) == len(results) + 1
