from setuptools import find_packages, setup

setup(
    name="lightx2v_sp",
    version="0.1.0",
    description="Wan2.1 video diffusion on several GPUs with Ulysses sequence parallelism",
    packages=find_packages(include=["lightx2v_sp", "lightx2v_sp.*"]),
    package_data={"lightx2v_sp.serve": ["page.html"]},
    python_requires=">=3.10",
    # torch is deliberately a range: CI installs the CPU build (torch==2.13.0) first, and a
    # range it satisfies installs nothing more (a bare `torch` would pull a multi-GB CUDA build).
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.33",
        "transformers>=4.50",
        "tokenizers>=0.19",  # the run reads tokenizer.json with it directly (models/t5/tokenizer.py)
        "omegaconf>=2.3",
        "einops",
        "safetensors",
        "imageio",
        "imageio-ffmpeg",
        "tqdm",
        "numpy",
        "huggingface_hub",  # model.path may be a repo id (pipeline/hub.py); diffusers needs it too
    ],
    extras_require={
        # peft: the LoRA tests make adapters with it and diffusers' load_lora_weights needs it
        # (pip install peft keeps an installed torch: it pulls only accelerate and psutil besides)
        # the serve extras: the tests run the server over real HTTP; selenium drives Debian's chromium
        # (.ci/run installs it) for the page's test
        "test": ["pytest>=7", "sentencepiece", "tokenizers", "peft>=0.17", "fastapi>=0.110", "uvicorn>=0.29",
                 "python-multipart>=0.0.9", "selenium>=4.10"],
        # python -m lightx2v_sp.serve: the HTTP server (the batch mode, generate --prompts, needs none of it)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # FlashAttention-4 (CuTe DSL, prebuilt, CUDA sm80-sm120; measured on sm90) is `auto`'s first pick.
        "flash": ["flash-attn-4>=4.0.0b36"],
        # FlashAttention-2 compiles against the local CUDA toolkit; for GPUs FA4 does not serve.
        "flash2": ["flash-attn>=2.5"],
        "dev": ["pytest>=7", "sentencepiece", "tokenizers", "peft>=0.17", "matplotlib", "ruff", "fastapi>=0.110",
                "uvicorn>=0.29", "python-multipart>=0.0.9", "selenium>=4.10"],
    },
)
