import subprocess
import sys

import pytest

from ulmrec_hf import __version__
from ulmrec_hf.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ulmrec-hf {__version__}"


def test_a_mistyped_command_suggests_the_right_one(capsys):
    assert main(["tarin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ulmrec: error: unknown command 'tarin' (did you mean 'train'?)")


@pytest.mark.parametrize("command", ["run", "ablate"])
def test_run_and_ablate_help_exit_zero(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ulmrec {command} RECIPE.yaml") and "--stage.key" in out


def test_stage_help_lists_its_own_options_first():
    proc = subprocess.run([sys.executable, "-m", "ulmrec_hf.cli", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    out = proc.stdout
    ranker, model, training = out.index("ranker:"), out.index("model (TRL ModelConfig):"), out.index("training (TRL SFTConfig):")
    assert ranker < model < training and out.index("--lora_last_layers") < model


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["retrieve", "--run_dir", str(tmp_path), "--retriever_lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert err == "ulmrec retrieve: error: `retriever_lr` was renamed to `retrieve.lr`\n"
    assert main(["retrieve", "--run_dir", str(tmp_path)]) == 2
    assert "missing or unfinished; run `ulmrec prepare` first" in capsys.readouterr().err
