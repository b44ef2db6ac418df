"""Tracker selection, tracker metric names, and keeping secrets out of written files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bigft.config import Config
from bigft.config_io import dump_config, load_config
from bigft.errors import BigftError, ConfigError
from bigft.slurm import job as slurm_job
from bigft.slurm import queue as slurm_queue
from bigft.tracking import flat_hparams, resolve_trackers, tracker_values
from tests.slurm.test_render import stubs, write_yaml

SECRET = "sk-test-0123456789abcdef"


def _config(tmp_path: Path, logging: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "some/model"},
                "data": {"train": "train.jsonl"},
                "logging": logging,
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    return path


def test_unknown_tracker_is_a_config_error_naming_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, {"trackers": ["tensorbord"]}))
    message = str(err.value)
    assert "logging.trackers" in message and "did you mean 'tensorboard'" in message
    for name in ("tensorboard", "wandb", "mlflow", "trackio"):
        assert name in message


def test_tracker_list_forms(tmp_path: Path) -> None:
    path = _config(tmp_path, {})
    assert load_config(path).logging.trackers == "auto"
    assert load_config(path, ["logging.trackers=wandb"]).logging.trackers == ["wandb"]
    assert load_config(path, ["logging.trackers=[]"]).logging.trackers == []
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        load_config(path, ["logging.trackers=[tensorboard,comet]"])


def test_auto_means_tensorboard_only_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_trackers("auto") == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    assert resolve_trackers("auto") == []
    assert resolve_trackers([]) == []


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio", "tensorboard"])
def test_missing_tracker_package_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BigftError, match=f"logging.trackers: {name} .*pip install {name}"):
        resolve_trackers(["tensorboard", name])


def test_tracker_names_and_hparams() -> None:
    train = {"time": 1.0, "step": 3, "loss": 1.5, "lr": 1e-3, "mem_mib": 812.5}
    assert tracker_values(train) == {"train/loss": 1.5, "train/lr": 1e-3, "train/mem_mib": 812.5}
    evaluation = {"step": 3, "split": "test", "eval_loss": 2.0, "exact_match": 0.25}
    assert tracker_values(evaluation) == {"test/eval_loss": 2.0, "test/exact_match": 0.25}
    flat = flat_hparams({"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "output_dir": "x"})
    assert flat == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.95]", "output_dir": "x"}


def test_saved_config_redacts_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_" + SECRET)
    env = {"MY_SERVICE_TOKEN": SECRET, "OMP_NUM_THREADS": "8", "TOKENIZERS_PARALLELISM": "x"}
    cfg = load_config(
        _config(tmp_path, {}),
        [f"slurm.env={json.dumps(env)}", f"model.name_or_path=https://hf_{SECRET}@host/m"],
    )
    text = dump_config(cfg)
    assert SECRET not in text
    again = Config.model_validate(yaml.safe_load(text))
    assert again.slurm.env == {
        "MY_SERVICE_TOKEN": "***",
        "OMP_NUM_THREADS": "8",
        "TOKENIZERS_PARALLELISM": "x",
    }
    assert again.model.name_or_path == "https://***@host/m"
    assert cfg.slurm.env["MY_SERVICE_TOKEN"] == SECRET  # the live config keeps the value


def test_slurm_job_takes_secrets_from_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"WANDB_API_KEY": SECRET, "OMP_NUM_THREADS": "4"}
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {"env": env}, tmp_path / "run")
    cfg = slurm_job.load_job_config(cfg_path, [])
    script = slurm_job.prepare_job(cfg, cfg_path)
    for path in script.parent.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(), path

    # `submit` hands the value to sbatch in its environment (sbatch passes it to the job).
    bin_dir, log = stubs(tmp_path)
    shutil.copy(bin_dir / "srun", bin_dir / "sbatch")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    slurm_queue.submit_script(script, script.parent, secrets=slurm_job.secret_env(cfg.slurm))
    [sbatch] = [json.loads(line) for line in log.read_text().splitlines()]
    assert sbatch["prog"] == "sbatch" and sbatch["env"]["WANDB_API_KEY"] == SECRET
    assert SECRET not in (script.parent / "job.json").read_text()

    def run_job(**extra: str) -> subprocess.CompletedProcess[str]:
        job_env = {"PATH": os.environ["PATH"], "STUB_LOG": str(log), "SLURM_JOB_ID": "5"}
        job_env |= {"SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1", **extra}
        return subprocess.run(
            ["bash", str(script)], env=job_env, capture_output=True, text=True, timeout=30
        )

    log.unlink()
    assert run_job(WANDB_API_KEY=SECRET).returncode == 0
    [srun] = [json.loads(line) for line in log.read_text().splitlines()]
    assert srun["env"]["WANDB_API_KEY"] == SECRET and srun["env"]["OMP_NUM_THREADS"] == "4"

    missing = run_job()
    assert missing.returncode != 0
    assert "WANDB_API_KEY" in missing.stderr and "secret" in missing.stderr


def test_rewind_drops_records_after_the_resumed_step(tmp_path) -> None:
    from bigft.tracking import MetricsLog, read_metrics

    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 2, "split": "validation", "eval_loss": 0.7})
    with log.path.open("a") as fh:
        fh.write('{"step": 5, "loss"')  # cut short by a kill
    assert log.rewind(2) == 3
    assert [(r["step"], r.get("split")) for r in read_metrics(tmp_path)] == [
        (1, None),
        (2, None),
        (2, "validation"),
    ]
    assert log.rewind(2) == 0
