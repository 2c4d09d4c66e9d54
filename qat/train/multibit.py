"""Training and evaluating a multi-bit model at several widths (``layers.multibit``, Wu et al. TPAMI
2023's "once QAT"): config block ``multibit`` (top level, set by the multi-bit experiments),

    multibit:
      train_bits: [8, 4, 2, ternary, 1]   # the widths whose losses are summed every step
      eval_bits: [8, 4, 2, ternary, 1]    # the widths every evaluation reports
      bn: per_width                       # BatchNorm running statistics per width (per_width_affine: and
                                          # gamma / beta), or shared by all
      bn_calibration_batches: 20          # re-estimate them before every evaluation (0: off)
      mgda_weight: 0.0                    # 0: the widths' gradients summed; 1: MGDA's min-norm combination
      loss_weights: null                  # or one weight per train width: L = sum_b w_b L_b (null: all 1)

train_bits defaulting to every width (8, 4, 2, ternary, 1) for a model with multi-bit layers, bn to
per_width, eval_bits to train_bits (bn: per_width) or every width (bn: shared). With per_width,
every BatchNorm keeps private running statistics per width (``qat.multibit.per_width_batchnorm``,
"switchable BN"), selected with the width by ``set_bits``, so training at width b updates only b's
statistics and evaluation at b uses exactly them; gamma and beta are shared; every
evaluated width must be trained (an untrained width's statistics would be the initial ones).
``bn: per_width_affine`` also gives every width its own gamma and beta (trained by its own loss only;
Any-Precision DNNs' switchable BatchNorm keeps both private). ``bn: shared`` is the model as before:
one set of statistics updated by every width's forward.

BatchNorm calibration (``bn_calibration_batches: N``, default 20; 0 turns it off). Training leaves
each width's running statistics a momentum average over the last steps' weights, which still move
(with per_width, each width gets one update per step); before every evaluation, and so before every
last.pt / best.pt that evaluation precedes, the statistics are re-estimated at the current weights:
``qat.multibit.calibrate_batchnorm`` (reset, then the cumulative average over N training batches at
every train width; no gradient, no weight change, dropout off) on the batches of
``calibration_inputs`` (the first N batches of data.batch_size of a shuffle of the training set
seeded by the run's seed: the same batches at every evaluation). The run's random state is restored
afterwards, so calibrating changes no training step (tested: the weights are bit-identical with and
without). Every evaluation, best.pt's choice among them included, and every checkpoint written
after one therefore carry statistics estimated at their own weights; the test figures of
summary.json are those of the calibrated last network.

Training step: L = sum_{b in train_bits} L_b, L_b the objective (cross-entropy or distillation) of
the network at width b. The paper's multi-objective optimization weighs the widths' losses; its
weights could not be read (docs/multibit_notes.md), so they are equal [I]. Computed as one forward
and backward per width on the same batch, gradients accumulating in the shared latent weights:
the gradient of the sum, with one width's activations in memory at a time. The step's logits (for
the train accuracy) are those of the first width in train_bits; its loss is the sum, and each
width's loss is logged as train/loss@<width>. ``train_bits: [w]`` is a single-width run of the same
quantizer: the per-width baseline at the same budget.

Fixed weights (``loss_weights: [w_1, ..., w_k]``, one positive number per train width in its order;
default null, every w_b = 1, the sum above): L = sum_b w_b L_b, each width's backward taking its
loss times w_b, so the gradient is sum_b w_b dL_b/dW with nothing kept apart. The weighted sum is
the plain scalarization of the widths' objectives [I]; the step's logged loss is that sum, the
parts stay unweighted. It and MGDA are two ways to weigh the widths: a run sets one.

Multi-objective weighting (``mgda_weight: m``, default 0: the sum above). The abstract says the
shared weights are trained by "multi-objective optimization ... considering the performance of all
networks"; MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
2018) is that method's standard form in deep learning, and this is its reading here [I]. With
g_b = dL_b/dW (each width's own backward, kept apart) and k widths:

    alpha_MGDA = argmin_{alpha in simplex} || sum_b alpha_b g_b ||^2      (exact, from the k x k Gram matrix)
    alpha      = m alpha_MGDA + (1 - m) / k
    gradient   = k sum_b alpha_b g_b                                       (m = 0: sum_b g_b, the plain sum)

The min-norm combination is a direction along which no width's loss increases (to first order)
while one exists; it leans on the widths whose gradients are small or agree with the others'.
Each step logs train/mgda_alpha@<width>. Costs k copies of the gradient (the plain sum needs none).

Evaluation: every split at every width of eval_bits, as <split>/<metric>@<width> (val/acc1@4b,
test/acc1@ternary); the plain <split>/<metric> (which chooses best.pt and fills summary.json's
val_acc1/test_acc1) is the mean over train_bits. The model is left at the first train width.
A model without multi-bit layers, or with no ``multibit`` block, trains and evaluates as before,
except that a ``multibit`` block for such a model is a ConfigError.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import qat.multibit as mb
from qat.train.config import ConfigError, to_plain

#: forward, objective, backward of (objective x loss_scale); returns (objective, logits, loss parts)
Step = Callable[..., tuple[torch.Tensor, torch.Tensor, dict]]
#: multibit.bn_calibration_batches when the block does not set it
CALIBRATION_BATCHES = 20
KEYS = ("train_bits", "eval_bits", "bn", "bn_calibration_batches", "mgda_weight", "loss_weights")


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """The point of the simplex minimising alpha^T G alpha, for the Gram matrix ``G`` of k vectors
    (G_ij = <g_i, g_j>): MGDA's min-norm element of their convex hull, solved exactly. The optimum
    lies in the relative interior of one face S of the simplex, where it is the min-norm point of
    the affine hull of {g_i : i in S}:

        [G_SS  1] [alpha_S]   [0]
        [1^T   0] [ -mu   ] = [1]          (least squares where G_SS is singular)

    Every face (2^k - 1 of them; k <= 5 widths here) is solved, and the feasible solution
    (alpha_S >= 0) of least norm is kept; on a tie with 1/k (e.g. all gradients zero), 1/k.
    (Sener & Koltun approximate the same point by Frank-Wolfe, which converges slowly when it lies
    on a face.)"""
    gram = gram.double()
    k = gram.shape[0]
    best = torch.full((k,), 1.0 / k, dtype=torch.float64)  # kept on ties: the plain sum's weights
    best_value = float(best @ gram @ best)
    for size in range(1, k + 1):
        for face in itertools.combinations(range(k), size):
            index = list(face)
            system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            system[:size, :size] = gram[index][:, index]
            system[:size, size] = system[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1.0
            solution = torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution.squeeze(1)
            alpha_face = solution[:size]
            if bool((alpha_face < -1e-12).any()) or abs(float(alpha_face.sum()) - 1.0) > 1e-9:
                continue
            alpha = torch.zeros(k, dtype=torch.float64)
            kept = alpha_face.clamp_min(0.0)
            alpha[index] = kept / kept.sum()
            value = float(alpha @ gram @ alpha)
            if value < best_value - 1e-12 * max(abs(best_value), 1e-300):
                best, best_value = alpha, value
    return best


def _widths(cfg: dict, key: str) -> list:
    value = cfg.get(key)
    if value is None:
        return list(mb.WIDTHS)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"multibit.{key} must be a non-empty list of widths from 8, 4, 2, ternary, 1, "
                          f"got {value!r}")
    try:
        widths = [mb.parse_width(v) for v in value]
    except ValueError as error:
        raise ConfigError(f"multibit.{key}: {error}") from None
    if len(set(widths)) != len(widths):
        raise ConfigError(f"multibit.{key} names a width twice: {value!r}")
    return widths


def _loss_weights(value, train_bits: list) -> list[float] | None:
    """multibit.loss_weights checked against train_bits: None (equal), or one positive number per width."""
    if value is None:
        return None
    numbers = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
    if not numbers or len(value) != len(train_bits):
        labels = ", ".join(mb.width_label(w) for w in train_bits)
        raise ConfigError(f"multibit.loss_weights must be {len(train_bits)} positive numbers, one per train width "
                          f"({labels}), or null for equal weights; got {value!r}")
    return [float(v) for v in value]


class Widths:
    """The widths a run trains and evaluates; a single pass (``train_bits = eval_bits = [None]``)
    for a model without multi-bit layers."""

    def __init__(self, model: nn.Module, train_bits: list, eval_bits: list, calibration_batches: int = 0,
                 mgda_weight: float = 0.0, loss_weights: list[float] | None = None):
        self.model, self.train_bits, self.eval_bits = model, train_bits, eval_bits
        self.calibration_batches, self.mgda_weight = calibration_batches, mgda_weight
        self.loss_weights = loss_weights or [1.0] * len(train_bits)
        if self.active:
            mb.set_bits(model, train_bits[0])

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> "Widths":
        block = to_plain(cfg) if cfg is not None else None
        if block is not None and not isinstance(block, dict):
            raise ConfigError(f"multibit must be a mapping with train_bits and eval_bits, got {block!r}")
        block = block or {}
        unknown = set(block) - set(KEYS)
        if unknown:
            raise ConfigError(f"multibit: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(KEYS)}")
        if not mb.multibit_quantizers(model):
            if block:
                raise ConfigError(f"multibit.{'/'.join(KEYS)} need a model with multi-bit layers (quant=multibit)")
            return cls(model, [None], [None])
        bn = block.get("bn", "per_width")
        if bn not in mb.BN_MODES:
            raise ConfigError(f"multibit.bn must be one of {', '.join(mb.BN_MODES)} (BatchNorm statistics per width, "
                              f"statistics and gamma / beta per width, or one set shared by all widths), got {bn!r}")
        train_bits = _widths(block, "train_bits")
        per_width = bn != "shared"
        eval_bits = train_bits if per_width and block.get("eval_bits") is None else _widths(block, "eval_bits")
        untrained = [mb.width_label(w) for w in eval_bits if w not in train_bits]
        if per_width and untrained:
            raise ConfigError(f"multibit.eval_bits has width(s) {', '.join(untrained)} not in multibit.train_bits: "
                              f"with multibit.bn={bn} their BatchNorm statistics would never be estimated; "
                              f"train them too or set multibit.bn=shared")
        calibration = block.get("bn_calibration_batches", CALIBRATION_BATCHES)
        if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 0:
            raise ConfigError(f"multibit.bn_calibration_batches must be a number of training batches >= 0 "
                              f"(0: no BatchNorm calibration), got {calibration!r}")
        mgda_weight = block.get("mgda_weight", 0.0)
        if isinstance(mgda_weight, bool) or not isinstance(mgda_weight, (int, float)) or not 0 <= mgda_weight <= 1:
            raise ConfigError(f"multibit.mgda_weight must be a number from 0 (the widths' gradients summed) to 1 "
                              f"(MGDA's min-norm combination), got {mgda_weight!r}")
        loss_weights = _loss_weights(block.get("loss_weights"), train_bits)
        if loss_weights is not None and mgda_weight > 0:
            raise ConfigError("multibit.loss_weights and multibit.mgda_weight > 0 are two ways to weigh the widths; "
                              "set one of them")
        widths = cls(model, train_bits, eval_bits, calibration, float(mgda_weight), loss_weights)
        if per_width:
            mb.per_width_batchnorm(model, affine=bn == "per_width_affine")
        return widths

    @property
    def active(self) -> bool:
        return self.train_bits != [None]

    def train_step(self, forward_backward: Step) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(summed loss, first width's logits, loss parts) of ``forward_backward(loss_scale)`` (forward,
        loss, backward of loss x loss_scale; returns (loss, logits, parts)) run once per train width,
        with the width's loss weight as the scale."""
        if not self.active:
            return forward_backward()
        total, first_logits, parts = None, None, {}
        weighted = self.mgda_weight > 0 and len(self.train_bits) > 1
        params = [p for p in self.model.parameters() if p.requires_grad] if weighted else []
        gradients = []
        for width, weight in zip(self.train_bits, self.loss_weights, strict=True):
            mb.set_bits(self.model, width)
            loss, logits, width_parts = forward_backward(weight)
            if weighted:  # keep this width's gradient apart
                gradients.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                            for p in params]))
                for p in params:
                    p.grad = None
            label = mb.width_label(width)
            parts[f"train/loss@{label}"] = loss.detach()
            parts.update({f"{key}@{label}": value for key, value in width_parts.items()})
            total = weight * loss.detach() if total is None else total + weight * loss.detach()
            first_logits = logits if first_logits is None else first_logits
        if weighted:
            parts.update(self._combine(params, gradients))
        mb.set_bits(self.model, self.train_bits[0])
        return total, first_logits, parts

    def _combine(self, params: list[nn.Parameter], gradients: list[torch.Tensor]) -> dict:
        """Sets the parameters' gradients to k sum_b alpha_b g_b (module docstring); returns the alphas."""
        stacked = torch.stack(gradients)
        k = len(gradients)
        as_double = stacked.double()
        alpha = self.mgda_weight * min_norm_weights(as_double @ as_double.T) + (1 - self.mgda_weight) / k
        combined = (alpha.to(stacked.dtype).unsqueeze(1) * stacked).sum(0) * k
        for p, grad in zip(params, combined.split([p.numel() for p in params]), strict=True):
            p.grad = grad.view_as(p).clone()
        return {f"train/mgda_alpha@{mb.width_label(w)}": alpha[i].float() for i, w in enumerate(self.train_bits)}

    def calibrate(self, inputs: Iterator) -> int:
        """Re-estimate the BatchNorm statistics of every train width from ``inputs`` (the model's
        inputs; at most ``calibration_batches`` of them are used): ``qat.multibit.calibrate_batchnorm``.
        Returns the number of batches used (0: off, or a model without multi-bit layers or BatchNorms)."""
        if not self.active or not self.calibration_batches:
            return 0
        return mb.calibrate_batchnorm(self.model, itertools.islice(inputs, self.calibration_batches),
                                      self.train_bits)

    def evaluate(self, evaluate_split: Callable[[], dict[str, float]]) -> dict[str, float]:
        """``evaluate_split()`` (one split's {split/metric: value}) at every eval width, labelled,
        plus the plain metrics averaged over the train widths."""
        if not self.active:
            return evaluate_split()
        results: dict[str, float] = {}
        per_width = {}
        for width in dict.fromkeys([*self.eval_bits, *self.train_bits]):
            mb.set_bits(self.model, width)
            per_width[width] = evaluate_split()
            if width in self.eval_bits:
                results.update({f"{key}@{mb.width_label(width)}": v for key, v in per_width[width].items()})
        mb.set_bits(self.model, self.train_bits[0])
        for key in per_width[self.train_bits[0]]:
            results[key] = sum(per_width[w][key] for w in self.train_bits) / len(self.train_bits)
        return results

    def describe(self, evaluation: dict[str, float]) -> dict | None:
        """summary.json's ``multibit``: the widths trained and evaluated and every per-width figure of
        ``evaluation`` ({'val/acc1@4b': ..}); None without multi-bit layers."""
        if not self.active:
            return None
        return {"train_bits": [str(w) for w in self.train_bits], "eval_bits": [str(w) for w in self.eval_bits],
                "bn_calibration_batches": self.calibration_batches,
                "evaluation": {key: value for key, value in evaluation.items() if "@" in key}}


def calibration_inputs(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                       device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """The inputs of a shuffle of ``dataset`` seeded by ``seed``, in batches of ``batch_size``
    (full batches only, unless the dataset is smaller than one), moved to ``device``: the batches
    BatchNorm calibration uses (``Widths.calibrate`` takes the first N). Nothing is loaded before
    the first batch is asked for. The shuffle draws from its own generator, the global random state
    is not touched by it (transforms with random augmentation do draw from it: the trainer restores it)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=len(dataset) >= batch_size, generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        yield inputs.to(device)
