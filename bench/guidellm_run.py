"""Run GuideLLM against Liftoff's OpenAI-compatible port and print its summary table.

Starts ``liftoff serve`` on free (or given) ports, waits until the management
``/status`` reports a live reader, runs ``guidellm run`` from a separate venv
against the OpenAI port (model = consumer group ``primary``), prints GuideLLM's
tables, and always stops the server (SIGTERM, then SIGKILL of its own process
group if it does not exit).

GuideLLM 0.8.1 checks ``GET {target}/health`` before benchmarking, which Liftoff answers
on every port (as ``/healthz``). GuideLLM is installed in its own venv (``--guidellm``)::

    python3 -m venv ~/.cache/liftoff/peers/guidellm-venv
    ~/.cache/liftoff/peers/guidellm-venv/bin/pip install torch==2.13.0 guidellm==0.8.1

Example::

    python bench/guidellm_run.py --streams 1,8 --max-seconds 35
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "liftoff"
PORT_FLAGS = (
    "--port",
    "--management-port",
    "--vertex-port",
    "--openai-port",
    "--snowflake-port",
    "--internal-port",
    "--sagemaker-port",
)
DEFAULT_TOKENIZER = CACHE / "bench-repository/dequantized/SmolLM2-135M-Instruct.Q4_1-98362432-bfloat16"


def live_readers(management_port: int) -> int:
    """Number of live readers reported by ``/status`` (0 if it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{management_port}/status", timeout=2) as resp:
            return len(json.load(resp)["status"]["live_readers"])
    except (OSError, ValueError, KeyError):
        return 0


def start_liftoff(args: argparse.Namespace, ports: list[int], log: Path) -> subprocess.Popen[bytes]:
    """Start ``liftoff serve`` in its own session, logging to ``log``."""
    cmd = [str(args.liftoff), "serve", "--model-name", args.model_name, "--device", args.device]
    cmd += ["--max-batch-size", str(args.max_batch_size)]
    if args.backend_options:
        cmd += ["--backend-options", args.backend_options]
    for flag, port in zip(PORT_FLAGS, ports, strict=True):
        cmd += [flag, str(port)]
    print("+", " ".join(cmd), flush=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_live(proc: subprocess.Popen[bytes], management_port: int, timeout_s: float) -> None:
    """Block until a reader is live; raise if the server exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"liftoff serve exited early with code {proc.returncode}")
        if live_readers(management_port) > 0:
            return
        time.sleep(1.0)
    raise TimeoutError(f"no live reader after {timeout_s:.0f}s")


def stop_liftoff(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the serve process; SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            print("liftoff did not stop after SIGTERM; killing its process group", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # the reader shares the session
        os.killpg(proc.pid, signal.SIGKILL)
    print(f"liftoff stopped (exit code {proc.returncode})", flush=True)


def guidellm_command(args: argparse.Namespace, openai_port: int) -> list[str]:
    """Build the ``guidellm run`` command line for the OpenAI port."""
    backend = {
        "kind": "openai_http",
        "target": f"http://127.0.0.1:{openai_port}",
        "model": "primary",
    }
    data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    return [
        str(args.guidellm_venv / "bin" / "guidellm"),
        "run",
        *("--backend", json.dumps(backend)),
        *("--tokenizer", f"kind=hf_auto,model={args.tokenizer}"),
        *("--data", data),
        *("--profile", "kind=concurrent", "--override", "profile.streams", args.streams),
        *("--constraint", f"kind=max_duration,seconds={args.max_seconds}"),
        *("--output", f"kind=json,path={args.output_json}"),
        "--disable-progress",
        *args.extra,
    ]


def run_guidellm(cmd: list[str], log: Path) -> int:
    """Run GuideLLM offline, keep its full output in ``log``, print its tables."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    print("+", " ".join(f"'{c}'" if "{" in c else c for c in cmd), flush=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    log.write_text(output)
    start = output.find("Run Summary Info")
    print(output[output.rfind("\n", 0, start) + 1 :] if start >= 0 else output[-4000:], flush=True)
    return result.returncode


def parse_args() -> argparse.Namespace:
    """Command-line options; anything after ``--`` goes to ``guidellm run``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--liftoff", type=Path, default=REPO / ".venv/bin/liftoff")
    parser.add_argument("--guidellm-venv", type=Path, default=CACHE / "peers/guidellm-venv")
    parser.add_argument("--model-name", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--backend-options", help='reader backend options as JSON, e.g. {"n_threads": 1}')
    parser.add_argument("--ports", help="7 comma-separated ports in the order " + " ".join(PORT_FLAGS))
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="local tokenizer dir")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,8", help="concurrency levels, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="duration of each level")
    parser.add_argument("--output-json", type=Path, default=Path("/tmp/guidellm_liftoff.json"))
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--load-timeout", type=float, default=300.0)
    parser.add_argument("extra", nargs="*", help="extra guidellm run arguments (after --)")
    return parser.parse_args()


def main() -> int:
    """Start Liftoff, benchmark it with GuideLLM, stop it; return GuideLLM's exit code."""
    args = parse_args()
    ports = [int(p) for p in args.ports.split(",")] if args.ports else free_ports(len(PORT_FLAGS))
    proc = start_liftoff(args, ports, args.log_dir / "guidellm_liftoff_server.log")
    try:
        wait_live(proc, ports[1], args.load_timeout)
        print(f"reader live; OpenAI base http://127.0.0.1:{ports[3]}/v1", flush=True)
        return run_guidellm(guidellm_command(args, ports[3]), args.log_dir / "guidellm_output.log")
    finally:
        stop_liftoff(proc)


if __name__ == "__main__":
    sys.exit(main())
