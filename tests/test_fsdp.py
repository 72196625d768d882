"""FSDP through ``accelerate launch``: examples/accelerate/fsdp.yaml (FSDP version 2) on two CPU processes over gloo
trains, checkpoints, resumes, and merges to the model one process trains on the same batches; FSDP version 1
setups that cannot train are refused before anything loads."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pos_swap
from pos_swap import train
from pos_swap.errors import PosSwapError
from conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--scheme", "yarn", "--factor", "2", "--seq-len", "32", "--max-steps", "4", "--save-steps", "2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    (folder / "corpus.txt").write_text(pos_swap.offline.pydoc_text()[:20000])
    return folder


def launch(folder, out, *extra):
    launcher = shutil.which("accelerate") or pytest.skip("accelerate's launcher is not on PATH")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    argv = [launcher, "launch", "--config_file", str(ROOT / "examples/accelerate/fsdp.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "-m", "pos_swap", "finetune", str(folder), *RUN, "--text",
            str(folder / "corpus.txt"), "--out", str(out), *extra]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]


def merged_weights(run: Path) -> dict:
    return pos_swap.from_pretrained(run / "merged").state_dict()


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_resumes_and_matches_one_process(tiny_folder, tmp_path):
    launch(tiny_folder, tmp_path / "fsdp")
    fsdp = merged_weights(tmp_path / "fsdp")

    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")  # as if stopped after the checkpoint at step 2
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "checkpoint-4")
    launch(tiny_folder, tmp_path / "resumed", "--resume")
    resumed = merged_weights(tmp_path / "resumed")
    assert max((fsdp[k] - resumed[k]).abs().max().item() for k in fsdp) < 1e-6

    settings = train.Settings(scheme="yarn", params={"factor": 2.0}, seq_len=32, max_steps=4, batch_size=2)
    train.finetune_from(str(tiny_folder), str(tiny_folder / "corpus.txt"), settings, out=tmp_path / "one",
                        progress=False)  # the two processes' batches of one, as one batch of two  # fmt: skip
    one, base = merged_weights(tmp_path / "one"), pos_swap.from_pretrained(tiny_folder).state_dict()
    assert max((fsdp[k] - one[k]).abs().max().item() for k in fsdp) < 1e-6
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4  # training moved the weights


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FSDP_USE_ORIG_PARAMS": "false"}, "set fsdp_use_orig_params: true"),
        ({"FSDP_USE_ORIG_PARAMS": "true", "FSDP_SYNC_MODULE_STATES": "true"}, "cannot start on CPU processes"),
        ({"FSDP_USE_ORIG_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "cannot start on CPU processes"),
    ],
)  # fmt: skip
def test_fsdp1_setups_that_cannot_train_are_refused_before_loading(monkeypatch, tmp_path, env, message):
    if torch.cuda.is_available() and "CPU" in message:
        pytest.skip("a GPU machine can sync module states")
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", **env}.items():
        monkeypatch.setenv(name, value)
    settings = train.Settings(scheme="yarn", params={"factor": 2.0}, seq_len=32, max_steps=1)
    with pytest.raises(PosSwapError, match=message):
        train.finetune_from(str(tmp_path / "no-such-model"), None, settings, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fsdp2_and_plain_launches_pass_the_check(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    train.run.check_launch()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    train.run.check_launch()
