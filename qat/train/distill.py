"""The training loss: cross-entropy (distill=none), or knowledge distillation from a teacher (distill=kd).

With student logits s, teacher logits t, labels y, temperature T:

    L = ce_weight * CE(y, s)
      + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))                  (Hinton et al. 2015)
      + feature_weight * L_RBD(student maps at a, teacher maps at b for the distill.features pairs (a, b))

KL(p || q) = sum_k p_k (log p_k - log q_k), averaged over the batch. The T^2 factor keeps the soft
term's gradient on the scale of the hard term's when T changes (Hinton et al. §2). ReActNet's
distributional loss is ce_weight=0, kd_weight=1, T=1.

Feature matching is DIR-Net's RBD as `qat.rbd.rbd_loss` computes it (the one place that knows
the formula; its docstring says which parts are inferred): a binary network's activations differ
from a float network's in scale, so each sample's flattened map is compared after L2 normalisation,

    L_RBD = sum_{pairs j} (1/N) sum_n || S_n^j / ||S_n^j||_2 - T_n^j / ||T_n^j||_2 ||_2^2,

each term 2 - 2 cos(S_n^j, T_n^j), in [0, 4]. Paired maps must have the same shape.

The teacher (`load_teacher`): a run of this trainer, rebuilt from the resolved config saved in its
checkpoint (model, quant) and loaded from its best.pt, else last.pt (a run directory) or the given
.pt, at progress 1.0 (the end of its schedules); or `torchvision:<name>` with a local state_dict file
(distill.teacher_weights; nothing is downloaded). It runs in eval mode, without gradients, on the
student's device, on the same (augmented) batch as the student, under the same autocast. Its class
count must be the run's. The evaluation loss stays the student's cross-entropy.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import qat
from qat import models
from qat.rbd import rbd_loss
from qat.train import checkpoint as ckpt
from qat.train.config import ConfigError, as_path, to_plain

DISTILL_NAMES = ("none", "kd")
TORCHVISION_PREFIX = "torchvision:"


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits / t, dim=1)
    log_p = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * (t * t)


class CrossEntropy:
    """distill=none: L = CE(y, s)."""

    def student_forward(self):
        return contextlib.nullcontext()

    def __call__(self, logits, labels, images):
        return F.cross_entropy(logits.float(), labels), {}

    def describe(self) -> None:
        return None


class FeatureTap:
    """Keeps the outputs of named modules of a model, from forward hooks, while `active`.

    The output is cloned: a following in-place activation (nn.ReLU(inplace=True)) would otherwise
    overwrite the kept map."""

    def __init__(self, model: nn.Module, names: list[str], role: str):
        modules = dict(model.named_modules())
        valid = [name for name in modules if name]
        for name in names:
            if name not in modules or not name:
                raise ConfigError(f"distill.features: no module {name!r} in the {role}; valid names: "
                                  f"{', '.join(valid)}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = False
        for name in dict.fromkeys(names):
            modules[name].register_forward_hook(self._keeper(name))

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            if self.active and torch.is_tensor(output):
                self.outputs[name] = output.clone()
        return keep

    @contextlib.contextmanager
    def tapping(self):
        self.outputs.clear()
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False


class Distillation:
    """distill=kd: the loss of the module docstring, with the teacher and the feature taps."""

    def __init__(self, cfg: Any, student: nn.Module, teacher: nn.Module, source: dict[str, Any],
                 amp: bool = False):
        self.temperature = float(cfg.temperature)
        self.ce_weight, self.kd_weight = float(cfg.ce_weight), float(cfg.kd_weight)
        self.feature_weight = float(cfg.get("feature_weight", 0.0))
        self.pairs = list((to_plain(cfg.get("features")) or {}).items())
        self.teacher, self.source, self.amp = teacher, source, amp
        self.student_tap = FeatureTap(student, [a for a, _ in self.pairs], "student")
        self.teacher_tap = FeatureTap(teacher, [b for _, b in self.pairs], "teacher")

    def student_forward(self):
        """Context of the student's training forward: its named features are kept."""
        return self.student_tap.tapping()

    def check_shapes(self, student: nn.Module, input_size: tuple[int, ...], num_classes: int, device) -> None:
        """One eval-mode forward of both on zeros: the teacher gives num_classes logits, paired maps
        have equal shapes. ConfigError otherwise."""
        x = torch.zeros(2, *input_size, device=device)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), self.student_tap.tapping() as kept_student, \
                    self.teacher_tap.tapping() as kept_teacher:
                student(x)
                try:
                    logits = self.teacher(x)
                except RuntimeError as error:
                    raise ConfigError(f"distill.teacher {self.source['teacher']} cannot take this run's input "
                                      f"{tuple(input_size)}: {str(error).splitlines()[0]}") from None
        finally:
            student.train(was_training)
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ConfigError(f"distill.teacher {self.source['teacher']} gives {tuple(logits.shape[1:])} outputs, "
                              f"this run's data has {num_classes} classes")
        for a, b in self.pairs:
            shape_a, shape_b = tuple(kept_student[a].shape[1:]), tuple(kept_teacher[b].shape[1:])
            if shape_a != shape_b:
                raise ConfigError(f"distill.features: student {a!r} gives {shape_a}, teacher {b!r} gives {shape_b}; "
                                  f"paired feature maps must have the same shape")

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor):
        """(L, {'train/loss_ce', 'train/loss_kd'[, 'train/loss_feature']}: detached parts)."""
        with torch.no_grad(), self.teacher_tap.tapping() as teacher_features, \
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            teacher_logits = self.teacher(images)
        ce = F.cross_entropy(logits.float(), labels)
        kd = kd_loss(logits.float(), teacher_logits.float(), self.temperature)
        loss = self.ce_weight * ce + self.kd_weight * kd
        parts = {"train/loss_ce": ce.detach(), "train/loss_kd": kd.detach()}
        if self.pairs:
            student_features = self.student_tap.outputs
            feature = rbd_loss({a: student_features[a] for a, _ in self.pairs},
                               {a: teacher_features[b] for a, b in self.pairs})
            loss = loss + self.feature_weight * feature
            parts["train/loss_feature"] = feature.detach()
            student_features.clear()
        return loss, parts

    def describe(self) -> dict[str, Any]:
        """What summary.json records: the teacher's source and the loss settings."""
        return {**self.source, "temperature": self.temperature, "ce_weight": self.ce_weight,
                "kd_weight": self.kd_weight, "feature_weight": self.feature_weight, "features": dict(self.pairs)}


def check_config(cfg: Any) -> None:
    """ConfigError naming the first bad distill.* value."""
    name = cfg.get("name")
    if name not in DISTILL_NAMES:
        raise ConfigError(f"unknown distill.name {name!r}; valid: {', '.join(DISTILL_NAMES)}")
    if name == "none":
        return
    if not cfg.get("teacher"):
        raise ConfigError("distill=kd needs distill.teacher=<run dir, .pt checkpoint, or torchvision:<name>>")
    for key, rule, ok in (("temperature", "> 0", lambda v: v > 0), ("ce_weight", ">= 0", lambda v: v >= 0),
                          ("kd_weight", ">= 0", lambda v: v >= 0), ("feature_weight", ">= 0", lambda v: v >= 0)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ConfigError(f"distill.{key} must be a number {rule}, got {value!r}")
    features = to_plain(cfg.get("features"))
    if features is not None and not (isinstance(features, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in features.items())):
        raise ConfigError(f"distill.features must be a mapping {{student module: teacher module}}, got {features!r}")


def _run_teacher(source: str, num_classes: int, in_channels: int) -> tuple[nn.Module, dict[str, Any]]:
    path = ckpt.trained_model_path(as_path(source))
    payload = ckpt.load_checkpoint(path)
    classes = payload.get("identity", {}).get("num_classes")
    if classes != num_classes:
        raise ConfigError(f"distill.teacher {path} classifies {classes} classes, this run's data has {num_classes}")
    config = OmegaConf.create(payload["config_yaml"])
    teacher = models.build_architecture(models.architecture(config.model, num_classes, in_channels))
    teacher = qat.quantize_model(teacher, to_plain(config.quant))
    ckpt.load_model_state(teacher, payload["model"], path)
    qat.set_progress(teacher, 1.0)
    return teacher, {"teacher": str(path), "teacher_identity": payload.get("identity", {})}


def _torchvision_teacher(name: str, weights: Any, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        raise ConfigError(f"unknown torchvision model {name!r} in distill.teacher"
                          + (f"; closest: {', '.join(close)}" if close else "")
                          + f" (torchvision.models.list_models() lists all {len(known)})")
    if not weights:
        raise ConfigError(f"distill.teacher=torchvision:{name} needs distill.teacher_weights=<local state_dict "
                          f"file>: nothing is downloaded")
    path = as_path(weights)
    if not path.is_file():
        raise ConfigError(f"distill.teacher_weights={weights} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with code in it, ...
        raise ConfigError(f"cannot read distill.teacher_weights={path} as a state_dict "
                          f"({type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    teacher = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    ckpt.load_model_state(teacher, state, path,
                          hint=f"the teacher must be a {name} for this run's {num_classes} classes")
    return teacher, {"teacher": f"{TORCHVISION_PREFIX}{name}", "teacher_weights": str(path)}


def load_teacher(cfg: Any, num_classes: int, in_channels: int, device) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher (eval mode, no gradients, on `device`) and the record of its source.
    Building it leaves the caller's RNG state as it was (a distilled run draws what an undistilled
    one draws)."""
    source = str(cfg.teacher)
    with torch.random.fork_rng(devices=[]):
        if source.startswith(TORCHVISION_PREFIX):
            teacher, record = _torchvision_teacher(source[len(TORCHVISION_PREFIX):], cfg.get("teacher_weights"),
                                                   num_classes)
        else:
            teacher, record = _run_teacher(source, num_classes, in_channels)
    teacher.eval().requires_grad_(False)
    return teacher.to(device), record


def build_objective(cfg: Any, student: nn.Module, num_classes: int, input_size: tuple[int, ...], device,
                    amp: bool):
    """The run's training loss: CrossEntropy for distill=none (or no distill group), else a checked
    Distillation."""
    if cfg is None:
        return CrossEntropy()
    check_config(cfg)
    if cfg.name == "none":
        return CrossEntropy()
    teacher, record = load_teacher(cfg, num_classes, input_size[0], device)
    objective = Distillation(cfg, student, teacher, record, amp)
    objective.check_shapes(student, input_size, num_classes, device)
    return objective
