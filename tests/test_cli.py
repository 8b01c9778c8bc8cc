"""The command line: help text, and bad input refused with one line, exit status 2, nothing written."""

import subprocess
import sys

import pytest

from paxlike.cli import main


def _paxlike(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "paxlike.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_help_lists_commands_and_macros():
    top = _paxlike("--help")
    assert top.returncode == 0 and "train" in top.stdout
    train = _paxlike("train", "--help")
    assert train.returncode == 0
    for macro in ("TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "MIXTURE_OR_TASK_NAME", "MESH_SHAPE",
                  "SEED", "CHECKPOINT_EVERY", "LOG_EVERY", "MODEL_DIR"):
        assert macro in train.stdout


BAD_INPUTS = [
    (["--gin_file", "models/no_such_model.gin"], "gin file 'models/no_such_model.gin' not found"),
    (["--gin.MESH_SHAPE={'data': 3}"], "MESH_SHAPE {'data': 3} has 3 devices but 8 are present"),
    (["--gin.MESH_SHAPE={'data': -1, 'fsdp': -1}"], "at most one axis may take the remaining"),
    (["--gin.MESH_SHAPE={'model': 8}"], "MESH_SHAPE has unknown axis 'model'"),
    (["--gin.BATCH_SIZE=12"], "BATCH_SIZE = 12 is not divisible by the data-parallel size 8"),
    (["--gin.SEQ_LEN=4096"], "SEQ_LEN = 4096 exceeds the model's max_seq_len = 2048"),
    (["--gin.MIXTURE_OR_TASK_NAME=nope"], "MIXTURE_OR_TASK_NAME 'nope' is not a registered"),
    (["--gin.TRAIN_STEPS=0"], "TRAIN_STEPS = 0; it must be a positive integer"),
    (["--gin.LEARNING_RATE=-1.0"], "learning rate -1.0 must be positive"),
    (["--gin.ModelConfig.vocab_size=100"], "ModelConfig.vocab_size = 100 is smaller than the data's"),
    (["--gin.ModelConfig.no_such_field=1"], "gin configuration error"),
    (["--gin.TRIAN_STEPS=5"], "--gin.TRIAN_STEPS: no gin file given defines the macro"),
    (["--gin.TRAIN_STEPS=abc"], "TRAIN_STEPS = 'abc'; it must be a positive integer"),
    (["--gin.MESH_SHAPE=data"], "MESH_SHAPE = 'data' is not a dict"),
    (["--gin.LEARNING_RATE=fast"], "learning rate 'fast' is not a number"),
    (["--gin.BATCH_SIZE=0"], "BATCH_SIZE = 0; it must be a positive integer"),
    (["--gin_file", "runs/llama_adamw.gin"], "require macro LEARNING_RATE but it is not set"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m[:30] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, args, message):
    # In-process (the command's own main), with this test process's 8 CPU devices.
    model_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--gin_file", "models/tiny_palm.gin", "--gin_file", "runs/pretrain.gin",
              "--model_dir", str(model_dir), "--no_progress", *args])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("paxlike: error:")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not model_dir.exists()


def test_one_real_process_refuses_with_exit_status_2(tmp_path):
    result = _paxlike("train", "--model_dir", str(tmp_path / "run"), "--gin.SEQ_LEN=0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "paxlike: error: SEQ_LEN = 0; it must be a positive integer")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_missing_model_dir_is_refused():
    result = _paxlike("train")
    assert result.returncode == 2
    assert "MODEL_DIR is not set; pass --model_dir DIR" in result.stderr


@pytest.mark.parametrize("line,kept", [
    ("I0000 00:00:1796031426.444527    9138 port.cc:153] oneDNN custom operations are on.", False),
    ("E0000 00:00:1796031113.465775    5428 cuda_platform.cc:52] failed call to cuInit: x", False),
    ("E0000 00:00:1796031113.465775    5428 pjrt_client.cc:52] an unexpected failure", True),
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
     False),
    ("normalizer.cc(51) LOG(INFO) normalizer_spec.name() is identity", False),
    ("paxlike: step 10 loss=2.1", True),
    ("Traceback (most recent call last):", True),
])
def test_the_terminal_filter_drops_routine_native_lines_only(line, kept):
    from paxlike import console

    assert console._keep(line) is kept
