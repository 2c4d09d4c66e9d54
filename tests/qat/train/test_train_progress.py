"""Whole-run progress: ETA of the whole run, the resumed position, plain lines off a terminal."""
import io
import logging

from test_train_resume import RESUME_OVERRIDES

from qat.train.run_progress import RunProgress, format_seconds
from qat.train.trainer import Trainer


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "qat.train.run_progress"]


def test_format_seconds():
    assert format_seconds(0) == "0:00:00" and format_seconds(3725.4) == "1:02:05"
    assert format_seconds(90061) == "25:01:01" and format_seconds(None) == "?" and format_seconds(float("inf")) == "?"


def test_off_a_terminal_one_plain_line_per_interval_with_whole_run_eta(caplog, capsys):
    caplog.set_level(logging.INFO, logger="qat")
    clock = FakeClock()
    progress = RunProgress(1000, enabled=True, interactive=False, log_interval=30, clock=clock)
    progress.set_description("epoch 1/10")
    for _ in range(1000):  # 0.125 s per step of 32 images: 8 steps/s, 256 img/s, 125 s in all
        clock.now += 0.125
        progress.update(32, loss="1.234")
    progress.close()
    lines = progress_lines(caplog)
    assert len(lines) == 4  # at 30, 60, 90 and 120 s: bounded by elapsed / interval, not by the step count
    # at 30 s: 240 of 1000 steps at 8 steps/s leaves 95 s for the whole run (not the epoch)
    assert lines[0] == "epoch 1/10 | step 240/1000 (24.0%) | 256 img/s | elapsed 0:00:30 | ETA 0:01:35 | loss 1.234"
    assert lines[3].startswith("epoch 1/10 | step 960/1000 (96.0%)") and "ETA 0:00:05" in lines[3]
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err + caplog.text


def test_evaluation_time_counts_towards_the_eta_but_not_towards_img_per_second(caplog):
    caplog.set_level(logging.INFO, logger="qat")
    clock = FakeClock()
    progress = RunProgress(400, initial=100, interactive=False, log_interval=0, clock=clock)
    clock.now += 1.0
    progress.update(64)
    with progress.paused():  # an evaluation of 3 s
        clock.now += 3.0
    clock.now += 1.0
    progress.update(64)
    # resumed at step 100: 2 steps in 5 s -> 0.4 steps/s for the 298 left; 128 images in 2 s of training
    assert progress.images_per_second() == 64 and progress.eta() == 298 / 0.4
    assert progress_lines(caplog)[-1] == "step 102/400 (25.5%) | 64 img/s | elapsed 0:00:05 | ETA 0:12:25"


def test_on_a_terminal_the_bar_spans_the_run_and_starts_at_the_resumed_step():
    stream = io.StringIO()
    progress = RunProgress(8, initial=4, interactive=True, refresh_interval=0, stream=stream)
    progress.set_description("epoch 2/2")
    assert " 4/8 " in stream.getvalue()  # drawn at the resumed position before any step
    for _ in range(4):
        progress.update(8)
    progress.close()
    assert "epoch 2/2" in stream.getvalue() and " 8/8 " in stream.getvalue() and "img/s" in stream.getvalue()


def test_disabled_progress_shows_nothing(caplog):
    caplog.set_level(logging.INFO, logger="qat")
    progress = RunProgress(5, enabled=False, interactive=True, log_interval=0, stream=io.StringIO())
    progress.update(8)
    assert progress.bar is None and progress_lines(caplog) == [] and progress.stream.getvalue() == ""


def test_training_off_a_terminal_logs_lines_from_the_resumed_step(compose, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="qat")
    overrides = [*RESUME_OVERRIDES, "quant=bwn", "trainer.progress_bar=true", "trainer.progress_log_interval=0"]
    Trainer(compose([*overrides, "trainer.max_steps=3"]), tmp_path / "first").fit()
    first = progress_lines(caplog)
    assert [line.split(" | ")[:2] for line in first] == [["epoch 1/2", f"step {n}/3 ({n / 3:.1%})"] for n in (1, 2, 3)]
    caplog.clear()
    Trainer(compose([*overrides, f"trainer.resume={tmp_path / 'first'}"]), tmp_path / "resumed").fit()
    resumed = [line.split(" | ")[:2] for line in progress_lines(caplog)]
    assert resumed[0] == ["epoch 1/2", "step 4/8 (50.0%)"] and resumed[-1] == ["epoch 2/2", "step 8/8 (100.0%)"]
    assert len(resumed) == 5
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err + caplog.text  # no bar (and no evaluation bars) off a terminal
