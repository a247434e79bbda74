from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="seer-adapter",
    version="0.1.0",
    description="SeerAttention as a PEFT-style adapter: learned block-sparse attention for any causal LM.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["seer_adapter", "seer_adapter.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "tqdm",
    ],
    extras_require={
        "gguf": ["gguf>=0.10", "accelerate"],  # loading the demo models from their GGUF (transformers needs both)
        "triton": ["triton>=3.0"],
        "train": ["datasets", "accelerate"],
        "peft": ["peft>=0.21"],  # PeftModel / AutoPeftModelForCausalLM load seer adapters (register_peft_method)
        "plots": ["matplotlib"],  # seer_adapter.plots, the notebooks and the CLI's --plot
        "dev": [
            "pytest>=8",
            "ruff",
            "gguf>=0.10",
            "triton>=3.0",
            "peft>=0.21",
            "datasets",
            "matplotlib",
            "nbclient",  # tests/test_notebooks.py runs examples/*.ipynb in a real Jupyter kernel
            "nbformat",
            "ipykernel",
        ],
    },
    entry_points={"console_scripts": ["seer-adapter=seer_adapter.cli:main"]},
)
