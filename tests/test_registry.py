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


PAGED_TOY_RUNNER = TOY_RUNNER + '''

class PagedToyRunner(ToyRunner):
    """The same toy with the paged contract too: the engine runs continuous batching for it."""

    name = "pagedtoy"
    supports_paged = True

    def _allocate_kv_pool_impl(self, num_blocks, block_size, max_num_seqs):
        self.steps = 0

    def _execute_paged_impl(self, step):
        self.steps += 1
        last = step.input_ids[step.logits_indices]
        logits = np.zeros((len(last), self.vocab), np.float32)
        logits[np.arange(len(last)), (last + 1) % self.vocab] = 1.0
        return logits
'''


def install_toy_plugin(root):
    """Lay out an installed distribution (package + .dist-info with entry_points.txt)."""
    (root / "toy_backend").mkdir()
    (root / "toy_backend" / "__init__.py").write_text(PAGED_TOY_RUNNER)
    info = root / "toy_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mini_engine.backends]\ntoy = toy_backend:ToyRunner\n"
                                           "pagedtoy = toy_backend:PagedToyRunner\n")
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


def test_both_kinds_of_plugin_run(tmp_path):
    """A plugin with only the static contract gets static batching; one with the paged contract
    gets continuous batching; the listing and describe() say which."""
    env = install_toy_plugin(tmp_path)
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json", env=env, check=True).stdout)}
    assert rows["toy"]["batching"] == "static" and rows["pagedtoy"]["batching"] == "continuous (blocks)"
    assert "continuous (blocks)" in run_cli("backends", env=env, check=True).stdout
    code = textwrap.dedent("""
        import json
        from mini_engine import Engine
        out = {}
        for name in ("toy", "pagedtoy"):
            with Engine(model="random:tiny", backend=name) as e:
                c = e.generate(["Hello world", "A"], max_new_tokens=3, ignore_eos=True)
                out[name] = {"tokens": [x.token_ids for x in c], "mode": e.describe()["generation"]["mode"],
                             "reason": e.describe()["generation"].get("reason"),
                             "paged_steps": getattr(e.runner, "steps", None)}
        print(json.dumps(out))
    """)
    full_env = dict(__import__("os").environ) | env
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=full_env).stdout)
    assert out["toy"]["tokens"] == out["pagedtoy"]["tokens"] == [[996, 997, 998], [33, 34, 35]]
    assert out["toy"]["mode"] == "static batching" and "static step contract" in out["toy"]["reason"]
    assert out["pagedtoy"]["mode"] == "continuous batching" and out["pagedtoy"]["paged_steps"] == 3


def test_broken_plugin_is_reported_not_fatal(tmp_path):
    env = install_toy_plugin(tmp_path)
    (tmp_path / "toy_backend" / "__init__.py").write_text("raise ImportError('toy needs libfoo')\n")
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json", env=env, check=True).stdout)}
    assert rows["toy"]["available"] is False and "libfoo" in rows["toy"]["reason"]
    assert rows["torch"]["available"]
    proc = run_cli("generate", "--backend", "toy", "-m", "random:tiny", "x", env=env)
    assert proc.returncode != 0 and "libfoo" in proc.stderr and "Traceback" not in proc.stderr
