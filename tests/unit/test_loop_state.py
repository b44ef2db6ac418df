"""The loop's state and trainer_state.json: what a checkpoint records and reads back."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bigft.loop.run import LoopState, Run
from bigft.tracking import strict_json


def trained_state() -> LoopState:
    return LoopState(
        step=12,
        saved_step=10,
        tokens=4096.0,
        targets=1234.0,
        skipped_steps=2,
        best={"metric": "eval_loss", "value": 1.25, "step": 10, "bad_evals": 1},
        last_eval={"eval_loss": 1.3, "samples": [{"prediction": "a", "reference": "b"}]},
        resumed={"from": "/runs/a/checkpoints/step-00000006", "step": 6, "warnings": ["rng"]},
    )


def test_loop_state_round_trips_through_json() -> None:
    state = trained_state()
    text = strict_json(state.state_dict(), indent=2)  # as save_checkpoint writes it
    loaded = LoopState()
    loaded.load_state_dict(json.loads(text))
    assert loaded.state_dict() == state.state_dict()
    assert (loaded.step, loaded.saved_step) == (12, 12)
    assert (loaded.tokens, loaded.targets, loaded.skipped_steps) == (4096.0, 1234.0, 2)
    assert loaded.best == state.best and loaded.last_eval == state.last_eval
    assert loaded.resumed == {"warnings": ["rng"]}  # where it came from is the loader's to say


def test_loop_state_file_layout() -> None:
    """The keys and values checkpoints have always held; skipped_steps appears once a step
    has been skipped."""
    assert LoopState().state_dict() == {
        "step": 0,
        "counters": {"tokens": 0, "targets": 0},
        "best": {},
        "last_eval": {},
        "resume_warnings": [],
    }
    assert trained_state().state_dict()["counters"] == {
        "tokens": 4096.0,
        "targets": 1234.0,
        "skipped_steps": 2,
    }


def test_older_trainer_state_loads_with_defaults() -> None:
    loaded = trained_state()
    loaded.load_state_dict({"step": 5, "loader": {}, "counters": {"tokens": 10.0}})
    assert loaded.state_dict() == {
        "step": 5,
        "counters": {"tokens": 10.0, "targets": 0},
        "best": {},
        "last_eval": {},
        "resume_warnings": [],
    }


class FakeStateful:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


class FakeMetrics:
    def __init__(self, size: int) -> None:
        self.bytes = size
        self.cut_to: int | None = None

    def size(self) -> int:
        return self.bytes

    def truncate(self, size: int) -> bool:
        self.cut_to = size
        return True


def fake_run(state: LoopState, position: int, lr: float, metrics_bytes: int) -> Run:
    """A Run whose built objects are stand-ins for what trainer_state.json records."""
    cfg: Any = SimpleNamespace(parallel=SimpleNamespace(strategy="ddp"))
    accelerator: Any = SimpleNamespace(num_processes=2, is_main_process=True)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        model=None,
        tokenizer=None,
        data=None,  # type: ignore[arg-type]
        layout=None,  # type: ignore[arg-type]
        metrics=FakeMetrics(metrics_bytes),  # type: ignore[arg-type]
        console=None,  # type: ignore[arg-type]
        optimizer=None,
        scheduler=FakeStateful({"last_epoch": 12, "lr": lr}),
        loader=FakeStateful({"epoch": 1, "position": position}),  # type: ignore[arg-type]
        total_steps=20,
        output_dir=Path("unused"),
        state=state,
    )


def test_trainer_state_file_round_trips_through_the_run() -> None:
    saved = fake_run(trained_state(), position=7, lr=0.5, metrics_bytes=321)
    text = strict_json(saved.state_dict(), indent=2)
    assert list(json.loads(text)) == [
        "step",
        "loader",
        "counters",
        "best",
        "scheduler",
        "strategy",
        "world_size",
        "metrics_bytes",
        "last_eval",
        "resume_warnings",
    ]
    resumed = fake_run(LoopState(), position=0, lr=1.0, metrics_bytes=999)
    resumed.load_state_dict(json.loads(text))
    assert resumed.state.state_dict() == saved.state.state_dict()
    assert resumed.loader.state_dict() == {"epoch": 1, "position": 7}
    assert resumed.scheduler.state_dict() == {"last_epoch": 12, "lr": 0.5}
    assert resumed.metrics.cut_to == 321  # type: ignore[attr-defined]
