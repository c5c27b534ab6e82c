"""Shared fixtures: offline mode, the repo on sys.path, tiny random model folders built once per session."""
import os
import sys

import pytest

# Before anything imports huggingface_hub, which reads these once: no test may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tiny import save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Keep offline mode on for code that reads the variables late, even if a test changed them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("models") / "tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("models") / "tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request, tiny_llama, tiny_qwen):
    return tiny_llama if request.param == "llama" else tiny_qwen


def run_script(script, *args, stdin=None):
    """Run a stage as a user would; returns CompletedProcess with text stdout/stderr."""
    import subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=ROOT)


def one_line_error(r, prog=None, logged=0):
    """Exit 2, no traceback, and stderr is one error line (after `logged` progress lines of a run that had begun)."""
    prog = prog or os.path.basename(r.args[1])
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("Loading weights")]
    return (r.returncode == 2 and len(lines) == 1 + logged and lines[-1].startswith(f"{prog}: error:")
            and "Traceback" not in r.stderr)
