"""Distillation (qat.train.distill): the loss formulas, the teacher, the checks, a run through train.py."""
import csv
import json
import math
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, SMOKE_OVERRIDES
from qat.rbd import rbd_loss
from qat.train.checkpoint import load_checkpoint, trained_model_path
from qat.train.config import ConfigError
from qat.train.distill import Distillation, kd_loss
from qat.train.trainer import Trainer

SMALL = [*SMOKE_OVERRIDES, "model=resnet20", "data.image_size=8", "optim=adam"]


def softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_is_t_squared_times_the_kl_of_the_softened_distributions():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    t = 3.0
    by_hand = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p, q = softmax(t_row, t), softmax(s_row, t)
        by_hand += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
    by_hand = t * t * by_hand / 2  # batch mean
    assert kd_loss(torch.tensor(student), torch.tensor(teacher), t).item() == pytest.approx(by_hand, rel=1e-6)
    assert kd_loss(torch.tensor(teacher), torch.tensor(teacher), t).item() == pytest.approx(0.0, abs=1e-7)


class Tiny(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_the_distillation_loss_adds_its_weighted_parts_and_only_the_student_learns():
    student, teacher = Tiny(0), Tiny(1).eval().requires_grad_(False)
    cfg = OmegaConf.create({"temperature": 2.0, "ce_weight": 0.3, "kd_weight": 0.7, "feature_weight": 0.5,
                            "features": {"body": "body"}})
    objective = Distillation(cfg, student, teacher, {"teacher": "tiny"})
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    with objective.student_forward():
        logits = student(x)
    loss, parts = objective(logits, y, x)
    with torch.no_grad():
        expected = (0.3 * torch.nn.functional.cross_entropy(student(x), y) + 0.7 * kd_loss(student(x), teacher(x), 2.0)
                    + 0.5 * rbd_loss([student.body(x)], [teacher.body(x)]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"train/loss_ce", "train/loss_kd", "train/loss_feature"}
    loss.backward()
    assert student.body.weight.grad is not None and student.body.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def teacher_run(compose, tmp_path, *overrides):
    Trainer(compose([*SMALL, "quant=fp", *overrides]), tmp_path / "teacher").fit()
    return tmp_path / "teacher"


def test_a_run_teacher_is_rebuilt_frozen_and_sees_the_students_batch(compose, tmp_path):
    teacher_dir = teacher_run(compose, tmp_path)
    cfg = compose([*SMALL, "quant=xnor", "distill=kd", f"distill.teacher={teacher_dir}", "trainer.max_steps=2",
                   "logger=csv", "logger.log_every=1", "distill.features={layers.2: layers.2}"])
    trainer = Trainer(cfg, tmp_path / "student")
    teacher = trainer.objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, tensor in load_checkpoint(trained_model_path(teacher_dir))["model"].items():
        assert torch.equal(teacher.state_dict()[key], tensor), key
    seen = {"student": [], "teacher": []}
    trainer.model.conv1.register_forward_pre_hook(lambda m, inputs: seen["student"].append(inputs[0].clone()))
    teacher.conv1.register_forward_pre_hook(lambda m, inputs: seen["teacher"].append(inputs[0].clone()))
    summary = trainer.fit()
    training = seen["student"][:2]  # then evaluation batches, which the teacher does not see
    assert len(seen["teacher"]) == 2 and all(torch.equal(a, b) for a, b in zip(training, seen["teacher"], strict=True))
    with open(tmp_path / "student" / "steps.csv") as handle:
        logged = {row["metric"] for row in csv.DictReader(handle)}
    assert {"train/loss_ce", "train/loss_kd", "train/loss_feature"} <= logged
    assert summary["distill"]["teacher"] == str(trained_model_path(teacher_dir))
    assert summary["distill"]["features"] == {"layers.2": "layers.2"}
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["distill"]["kd_weight"] == 0.9


def test_distillation_changes_neither_the_students_initialisation_nor_the_random_stream(compose, tmp_path):
    teacher_dir = teacher_run(compose, tmp_path, "seed=5")
    plain = Trainer(compose([*SMALL, "quant=xnor"]), tmp_path / "plain").model.state_dict()
    plain_rng = torch.get_rng_state()
    distilled = Trainer(compose([*SMALL, "quant=xnor", "distill=kd", f"distill.teacher={teacher_dir}"]),
                        tmp_path / "distilled")
    assert torch.equal(torch.get_rng_state(), plain_rng)  # building the teacher drew nothing from it
    for key, tensor in plain.items():
        assert torch.equal(distilled.model.state_dict()[key], tensor), key


@pytest.mark.parametrize("overrides, message", [
    (["distill=kd"], "distill=kd needs distill.teacher=<run dir, .pt checkpoint, or torchvision:<name>>"),
    (["distill=kd", "distill.teacher=TEACHER", "distill.temperature=0"],
     "distill.temperature must be a number > 0, got 0"),
    (["distill=kd", "distill.teacher=TEACHER", "data.num_classes=5"],
     "classifies 10 classes, this run's data has 5"),
    (["distill=kd", "distill.teacher=TEACHER", "distill.features={layers.9: layers.2}"],
     "distill.features: no module 'layers.9' in the student; valid names: conv1, bn1, act1, layers, layers.0,"),
    (["distill=kd", "distill.teacher=TEACHER", "distill.features={layers.1: layers.2}"],
     "distill.features: student 'layers.1' gives (32, 4, 4), teacher 'layers.2' gives (64, 2, 2)"),
    (["distill=kd", "distill.teacher=torchvision:resnet81"],
     "unknown torchvision model 'resnet81' in distill.teacher; closest: resnet18"),
    (["distill=kd", "distill.teacher=torchvision:resnet18"],
     "distill.teacher=torchvision:resnet18 needs distill.teacher_weights=<local state_dict file>: "
     "nothing is downloaded"),
])
def test_bad_distillation_settings_are_one_error_line(compose, tmp_path, overrides, message):
    teacher_dir = teacher_run(compose, tmp_path) if any("TEACHER" in o for o in overrides) else None
    overrides = [o.replace("TEACHER", str(teacher_dir)) for o in overrides]
    with pytest.raises(ConfigError) as error:
        Trainer(compose([*SMALL, "quant=xnor", *overrides]), tmp_path / "student")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_torchvision_teacher_from_a_local_weights_file(compose, tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    trainer = Trainer(compose([*SMALL, "quant=xnor", "distill=kd", "distill.teacher=torchvision:resnet18",
                               f"distill.teacher_weights={tmp_path / 'resnet18.pth'}"]), tmp_path / "student")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(trainer.objective.teacher(x), reference(x))
    summary = trainer.fit()
    assert summary["distill"]["teacher"] == "torchvision:resnet18" and summary["steps"] == 1


def test_train_py_distills_a_binary_student_from_a_float_run(python, subprocess_env, compose, tmp_path):
    teacher_dir = teacher_run(compose, tmp_path)
    result = subprocess.run([python, str(REPO / "train.py"), *SMALL, "quant=xnor", "distill=kd",
                             f"distill.teacher={teacher_dir}", "distill.features={layers.2: layers.2}",
                             "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'student'}"],
                            cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["distill"]["teacher"].endswith("best.pt")
