"""Backends are entry points; a third-party distribution adds one with no change here."""
import json
import subprocess
import sys
import textwrap

from conftest import run_cli

TOY_RUNNER = '''
"""A third-party backend: 'predicts' token (last + 1) mod vocab, in numpy."""
import numpy as np
from mini_engine import Availability, Runner


class ToyRunner(Runner):
    name = "toy"
    supported_devices = ("cpu",)

    @classmethod
    def availability(cls):
        return Availability(True, devices=cls.supported_devices, version="0.1")

    def _load_impl(self):
        self.vocab = self.config.model.config.vocab_size

    def _allocate_kv_impl(self, num_slots, max_seq_len):
        pass

    def _execute_impl(self, step):
        logits = np.zeros((step.batch_size, self.vocab), np.float32)
        logits[np.arange(step.batch_size), (step.input_ids[:, -1] + 1) % self.vocab] = 1.0
        return logits
'''


def install_toy_plugin(root):
    """Lay out an installed distribution (package + .dist-info with entry_points.txt)."""
    (root / "toy_backend").mkdir()
    (root / "toy_backend" / "__init__.py").write_text(TOY_RUNNER)
    info = root / "toy_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mini_engine.backends]\ntoy = toy_backend:ToyRunner\n")
    return {"PYTHONPATH": str(root)}


def test_builtin_backends_listed_without_heavy_imports():
    code = textwrap.dedent("""
        import json, sys
        import mini_engine
        infos = mini_engine.list_backends()
        heavy = [m for m in ("torch", "onnxruntime", "tensorrt", "transformers") if m in sys.modules]
        print(json.dumps({"names": [i.name for i in infos], "heavy": heavy,
                          "torch": [i.to_dict() for i in infos if i.name == "torch"][0]}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)
    assert {"torch", "onnxruntime", "tensorrt"} <= set(out["names"])
    assert out["heavy"] == []
    assert out["torch"]["available"] and "cpu" in out["torch"]["devices"] and out["torch"]["version"]


def test_unimplemented_backends_say_so():
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json", check=True).stdout)}
    trt = rows["tensorrt"]
    assert trt["available"] is False and trt["reason"]


def test_third_party_plugin_lists_and_runs(tmp_path):
    env = install_toy_plugin(tmp_path)
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json", env=env, check=True).stdout)}
    assert rows["toy"]["available"] and rows["toy"]["distribution"] == "toy-backend"
    assert rows["toy"]["entry_point"] == "toy_backend:ToyRunner"
    proc = run_cli("generate", "--backend", "toy", "-m", "random:tiny", "-n", 3, "--json", "Hello world",
                   env=env, check=True)
    row = json.loads(proc.stdout)
    assert row["prompt_token_ids"] == [15496, 995]
    assert row["token_ids"] == [996, 997, 998]
    assert row["backend"] == "toy"


def test_broken_plugin_is_reported_not_fatal(tmp_path):
    env = install_toy_plugin(tmp_path)
    (tmp_path / "toy_backend" / "__init__.py").write_text("raise ImportError('toy needs libfoo')\n")
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json", env=env, check=True).stdout)}
    assert rows["toy"]["available"] is False and "libfoo" in rows["toy"]["reason"]
    assert rows["torch"]["available"]
    proc = run_cli("generate", "--backend", "toy", "-m", "random:tiny", "x", env=env)
    assert proc.returncode != 0 and "libfoo" in proc.stderr and "Traceback" not in proc.stderr
