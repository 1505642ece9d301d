import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deebert_cli.cli.app import app
from deebert_cli.core.device import resolve_device
from deebert_cli.core.errors import UserError

CORE = Path(__file__).resolve().parent.parent / "deebert_cli" / "core"


def test_device_cpu_and_auto():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "cuda:99"])
def test_device_errors(spec):
    if spec == "cuda:99" and not torch.cuda.is_available():
        spec = "cuda"  # on a CPU machine any CUDA request must fail cleanly
    with pytest.raises(UserError):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_on_cli_is_one_line_exit_2(trained_ckpt):
    r = CliRunner().invoke(app, ["predict", "--checkpoint", trained_ckpt, "--device", "cuda:1"], input="good\n")
    assert r.exit_code == 2
    assert "CUDA is not available" in r.output
    assert "Traceback" not in r.output


def test_core_never_imports_typer_or_rich():
    for f in CORE.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("typer", "rich", "click") for n in names), f"{f.name} imports {names}"
    code = ("import sys, deebert_cli.core.train.stage1, deebert_cli.core.train.stage2, deebert_cli.core.runtime.stream,"
            " deebert_cli.core.analysis.report;"
            "print(sorted(m for m in ('typer','rich','click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_commands_fast_and_without_torch():
    code = ("import sys, time; t=time.perf_counter(); from deebert_cli.cli.app import app;"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "deebert_cli", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0
    for cmd in ("finetune", "train-exits", "predict", "analyze"):
        assert cmd in r.stdout
    assert elapsed < 5  # a loose bound for a shared machine; lazy imports keep it ~0.2 s


def test_help_shows_install_hints_with_their_extra():
    """Help is plain text, not rich markup: `[onnx]` in `pip install 'deebert-cli[onnx]'` is not a tag to
    drop. Each command's help names the extra it needs, and the command list has one line per command."""
    import re

    from typer.testing import CliRunner

    from deebert_cli.cli.app import app

    runner = CliRunner()
    hints = {}
    for cmd in ("finetune", "train-exits", "predict", "analyze", "calibrate", "export", "serve", "predict-dataset"):
        r = runner.invoke(app, [cmd, "--help"], terminal_width=100)
        assert r.exit_code == 0, r.output
        text = " ".join(r.output.split())
        assert "pip install 'deebert-cli'" not in text, cmd
        hints[cmd] = set(re.findall(r"deebert-cli\[(\w+)\]", text))
    assert "onnx" in hints["export"] and "onnx" in hints["predict"] and "onnx" in hints["serve"]
    top = runner.invoke(app, ["--help"], terminal_width=100).output
    listed = [line.split()[0] for line in top.split("Commands:")[1].splitlines() if line.startswith("  ") and line.split()]
    assert listed == ["finetune", "train-exits", "predict", "analyze", "calibrate", "export", "serve", "predict-dataset"]
