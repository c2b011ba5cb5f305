"""Peer servers for ``bench/generation.py``: build or install them once into a cache outside the repository.

- ``llama-server`` is built from the C++ source that ships inside the llama-cpp-python 0.3.36 sdist, with the
  portable ISA flags of docs (offline-models.md §2a/§7; the default native build crashes on this VM's AMX path).
- ``transformers serve`` runs from its own virtualenv (so that its extra dependencies never touch the project's
  venv) against a dequantized bf16 copy of SmolLM2-135M-Instruct made once from the bundled GGUF.

Everything lands under ``--peers-dir`` (default ``~/.cache/liftoff/peers``); each step is skipped when its result
is already there, and the heavy steps run under ``nice -n 19``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_VERSION = "0.3.36"
TORCH_VERSION = "2.13.0"
DEFAULT_PEERS_DIR = Path("~/.cache/liftoff/peers").expanduser()
LLAMA_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
    "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
]  # fmt: skip
# What ``transformers serve`` imports beyond transformers itself (its CLI checks for these at start).
SERVE_PACKAGES = [f"torch=={TORCH_VERSION}", "transformers==5.24.0", "fastapi", "uvicorn", "openai", "pydantic", "rich"]
# What loading a GGUF into transformers needs (for the one-time dequantization, run in the same venv).
DEQUANT_PACKAGES = ["gguf", "accelerate"]
DEQUANT_DIR_NAME = "smollm2-135m-instruct-bf16"


def log(message: str) -> None:
    """``common.log.log``'s line, written out here: tests/llama_server.py loads this file by path, without
    ``bench/`` on ``sys.path``, so it imports nothing from ``common``."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _run(command: list[str], cwd: Path | None = None, log_path: Path | None = None, nice: bool = True) -> float:
    """Run ``command`` (under ``nice -n 19`` when ``nice``), output to ``log_path``; return seconds; raise on error."""
    full = ["nice", "-n", "19", *command] if nice else command
    started = time.monotonic()
    log(f"running: {' '.join(full)}" + (f" (log: {log_path})" if log_path else ""))
    if log_path is None:
        result = subprocess.run(full, cwd=cwd, check=False)
    else:
        with log_path.open("ab") as out:
            result = subprocess.run(full, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
        raise RuntimeError(f"{command[0]} failed with exit code {result.returncode}:\n{tail}")
    return time.monotonic() - started


def llama_server_binary(peers_dir: Path) -> Path:
    return peers_dir / f"llama-cpp-python-{LLAMA_VERSION}" / "build" / "bin" / "llama-server"


def ensure_llama_server(peers_dir: Path) -> Path:
    """The ``llama-server`` binary, built once (about 4 minutes on 2 cores) and reused."""
    binary = llama_server_binary(peers_dir)
    if binary.is_file():
        return binary
    peers_dir.mkdir(parents=True, exist_ok=True)
    sdist_dir = peers_dir / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(sdist_dir)], nice=False)  # fmt: skip
    source_root = peers_dir / f"llama_cpp_python-{LLAMA_VERSION}"
    if not source_root.is_dir():
        log(f"unpacking {sdist}")
        with tarfile.open(sdist) as archive:
            archive.extractall(peers_dir, filter="data")
    source = source_root / "vendor" / "llama.cpp"
    build = binary.parent.parent
    build.mkdir(parents=True, exist_ok=True)
    build_log = build / "build.log"
    seconds = _run(["cmake", "-S", str(source), "-B", str(build), *LLAMA_CMAKE_FLAGS], log_path=build_log)
    jobs = f"-j{os.cpu_count() or 2}"
    seconds += _run(["cmake", "--build", str(build), "--target", "llama-server", jobs], log_path=build_log)
    log(f"built {binary} in {seconds:.0f} s")
    if not binary.is_file():
        raise RuntimeError(f"the build finished but {binary} is missing; see {build_log}")
    return binary


def serve_venv(peers_dir: Path) -> Path:
    return peers_dir / "tf-serve-venv"


def ensure_transformers_serve(peers_dir: Path) -> Path:
    """The ``transformers`` CLI of a venv that has what ``transformers serve`` needs (made once)."""
    venv = serve_venv(peers_dir)
    cli = venv / "bin" / "transformers"
    marker = venv / ".liftoff-bench-ready"
    if cli.is_file() and marker.is_file():
        return cli
    peers_dir.mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").is_file():
        _run([sys.executable, "-m", "venv", str(venv)], nice=False)
    pip_log = peers_dir / "tf-serve-pip.log"
    seconds = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *SERVE_PACKAGES], log_path=pip_log)
    marker.write_text(json.dumps({"packages": SERVE_PACKAGES, "install_s": round(seconds, 1)}))
    log(f"installed transformers serve into {venv} in {seconds:.0f} s")
    return cli


def find_dequantized(repository_paths: list[Path]) -> Path | None:
    """A dequantized SmolLM2 checkpoint that Liftoff's transformers backend already made
    (``<repository_path>/dequantized/<gguf stem>-<size>-<dtype>/``), bf16 first, if any."""
    found = []
    for root in repository_paths:
        for config in sorted((root / "dequantized").glob("*/config.json")):
            folder = config.parent
            if "smollm2" in folder.name.lower() and any(folder.glob("*.safetensors")):
                found.append(folder)
    found.sort(key=lambda folder: "bfloat16" not in folder.name)
    return found[0] if found else None


def ensure_dequantized(peers_dir: Path, gguf: Path) -> Path:
    """A bf16 Hugging Face checkpoint of the GGUF (the workaround of offline-models.md §1), made once."""
    out = peers_dir / DEQUANT_DIR_NAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    log(f"dequantizing {gguf} into {out} (once)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    script = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "folder, name, out = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)\n"
        "m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)\n"
        "cfg = m.config\n"
        "if hasattr(cfg, 'quantization_config'):\n"
        "    del cfg.quantization_config\n"
        "m2 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)\n"
        "m2.load_state_dict(m.state_dict())\n"
        "m2 = m2.to(torch.bfloat16)\n"
        "m2.config.dtype = torch.bfloat16\n"
        "m2.generation_config = m.generation_config\n"
        "m2.save_pretrained(out)\n"
        "tok.save_pretrained(out)\n"
    )
    python = serve_venv(peers_dir) / "bin" / "python"  # not the project's venv: it lacks accelerate
    if not python.is_file():
        ensure_transformers_serve(peers_dir)
    _run([str(python), "-m", "pip", "install", "-q", *DEQUANT_PACKAGES], log_path=peers_dir / "tf-serve-pip.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    result = subprocess.run(
        ["nice", "-n", "19", str(python), "-c", script, str(gguf.parent), gguf.name, str(tmp)], env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"dequantizing {gguf} failed with exit code {result.returncode}")
    tmp.rename(out)
    log(f"dequantized into {out} in {time.monotonic() - started:.0f} s")
    return out


def main() -> int:
    """``python bench/genbench_peers.py [--llama-server-only] [PEERS_DIR]``: build and install every peer now (no
    benchmark); ``--llama-server-only`` builds just llama-server (``make llama-server``, for the tests)."""
    args = [arg for arg in sys.argv[1:] if arg != "--llama-server-only"]
    if len(args) > 1 or any(arg.startswith("-") for arg in args):  # never take an option (--help) for a folder
        print(main.__doc__)
        return 0 if args in (["--help"], ["-h"]) else 2
    peers_dir = Path(args[0]) if args else DEFAULT_PEERS_DIR
    print(ensure_llama_server(peers_dir))
    if "--llama-server-only" in sys.argv:  # needs nothing but pip and cmake: runs while the venv installs
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from liftoff.backends.resolve import resolve_model

    gguf = resolve_model("smollm2-135m-instruct", peers_dir).path
    print(ensure_transformers_serve(peers_dir))
    print(ensure_dequantized(peers_dir, gguf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
