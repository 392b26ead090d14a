"""scripts/torch_index.sh: which index setup.sh gives pip for torch. The decision, never a download."""
import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CPU = "https://download.pytorch.org/whl/cpu"


def decide(gpu: int, reachable: int, **env) -> tuple[str, str]:
    full = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX", "EXTRAS", "TORCH_CPU_INDEX")} | env
    proc = subprocess.run(["bash", "-c", f". '{SCRIPTS / 'torch_index.sh'}'; torch_index_decide {gpu} {reachable}"],
                          capture_output=True, text=True, env=full, check=True, timeout=30)
    return proc.stdout.strip(), proc.stderr.strip()


@pytest.mark.parametrize("gpu, reachable, env, index", [
    (0, 1, {}, CPU),  # a fresh CPU machine: the CPU-only build, not GBs of CUDA wheels
    (0, 0, {}, ""),  # this project's machines: only their index answers, where torch is a CPU build
    (1, 1, {}, ""),  # an NVIDIA GPU: the default (CUDA) build
    (0, 1, {"EXTRAS": "gpu,dev"}, ""),  # asked for the GPU stack
    (0, 1, {"EXTRAS": "onnx,dev"}, CPU),
    (1, 0, {"TORCH_INDEX": "https://download.pytorch.org/whl/cu126"}, "https://download.pytorch.org/whl/cu126"),
    (0, 1, {"TORCH_INDEX": "none"}, ""),
    (0, 1, {"TORCH_CPU_INDEX": "https://mirror.example/cpu"}, "https://mirror.example/cpu"),
])
def test_decision(gpu, reachable, env, index):
    got, why = decide(gpu, reachable, **env)
    assert got == index
    assert why.startswith("torch: ") and "\n" not in why


def test_unreachable_cpu_index_says_what_to_do():
    _, why = decide(0, 0)
    assert "cannot be reached" in why and "TORCH_INDEX" in why


def test_nvidia_smi_listing_a_gpu_counts_as_a_gpu(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-x)'\n")
    fake.chmod(0o755)
    env = os.environ | {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", f". '{SCRIPTS / 'torch_index.sh'}'; has_nvidia_gpu"], env=env, timeout=30)
    assert proc.returncode == 0


def test_whole_script_without_a_reachable_cpu_index_adds_nothing():
    # A closed local port stands for an index this machine cannot reach: whether or not this
    # machine has a GPU, pip's configured index alone is used, as before this script existed.
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX", "EXTRAS")}
    env["TORCH_CPU_INDEX"] = "http://127.0.0.1:9"
    proc = subprocess.run(["bash", str(SCRIPTS / "torch_index.sh")], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    assert proc.stdout == ""


def test_setup_passes_the_chosen_index_to_pip():
    env = os.environ | {"DRY_RUN": "1", "TORCH_INDEX": "https://mirror.example/cpu"}
    proc = subprocess.run(["bash", str(SCRIPTS / "setup.sh")], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    (install,) = [line for line in proc.stdout.splitlines() if "-e .[" in line]
    assert "--extra-index-url https://mirror.example/cpu -c constraints.txt" in install
    env["TORCH_INDEX"] = "none"
    proc = subprocess.run(["bash", str(SCRIPTS / "setup.sh")], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    assert "--extra-index-url" not in proc.stdout
