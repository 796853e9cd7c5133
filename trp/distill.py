"""Knowledge distillation (Hinton, Vinyals & Dean, 2015, arXiv:1503.02531): soft targets from a teacher.

The student learns from the labels and from the teacher's softened distribution:

    L = (1 − W) · CE(z_s, y) + W · T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )

with student logits ``z_s``, teacher logits ``z_t``, weight ``W`` in [0, 1] and temperature ``T``.
The gradient of the soft term scales as 1/T², so the T² factor keeps its share of the gradient
independent of T (Hinton et al., section 2). The teacher runs in eval mode without gradients, once
per batch (:class:`Teacher`); under torchrun each rank runs its own copy on its own batch, so
nothing crosses ranks.

Example:
    >>> z_s, z_t, y = torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])
    >>> round(float(distill_loss(z_s, z_t, y, weight=0.5, temperature=4.0)), 4)  # ½·ln 3, KL = 0
    0.5493
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trp import conversions
from trp.errors import TRPError
from trp.validate import number

__all__ = ["distill_loss", "check_settings", "Teacher"]


def check_settings(weight: float, temperature: float) -> tuple[float, float]:
    """Validated ``(weight, temperature)``: weight in [0, 1], temperature > 0.

    Example:
        >>> check_settings(0.5, 4)
        (0.5, 4.0)
    """
    weight = number(weight, "distill-weight", low=0.0, high=1.0)
    temperature = number(temperature, "distill-temperature", low=0.0, low_open=True)
    return weight, temperature


def distill_loss(student: Tensor, teacher: Tensor, target: Tensor, weight: float, temperature: float) -> Tensor:
    """``(1 − W)·CE(student, y) + W·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, batch means.

    Computed in float32 (logits under AMP may be half precision). ``weight = 0`` is plain
    cross-entropy; ``weight = 1`` learns from the teacher alone.

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> float(distill_loss(z, z, torch.tensor([0]), 1.0, 2.0))  # the student matches the teacher
        0.0
    """
    s, t = student.float(), teacher.float().detach()
    hard = F.cross_entropy(s, target)
    if weight == 0:
        return hard
    # KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s); kl_div takes the student's log-probabilities first.
    soft = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard + weight * temperature**2 * soft


class Teacher:
    """A frozen model whose logits are the soft targets: eval mode, no gradients, one forward per batch,
    conv weights in channels-last layout (faster for inference on CPUs and GPUs alike), and on the CPU
    run as a frozen TorchScript graph traced at the first batch.

    The graph (``torch.jit.trace`` → ``freeze`` → ``optimize_for_inference``: weights as constants,
    oneDNN convolutions with their ReLUs fused) ran a ResNet-20 teacher at batch 128 on one thread of
    the 2-core reference CPU in 124 ms where eager channels-last took 157 ms, and took a TRP +
    distillation epoch from 1.30x to 1.25x a plain one (benchmarks/FINETUNE.md). Its logits are
    checked against eager mode on that first batch; a model that does not trace, or whose graph
    disagrees (beyond float reordering), runs eagerly, as does any teacher on a GPU. The weights are
    read into the graph at the first batch: a teacher is frozen, so later changes to ``model`` are
    not seen.

    Args:
        model: The teacher (its parameters are set to ``requires_grad=False``).
        script: False keeps eager mode (e.g. to compare the two).

    Example:
        >>> teacher = Teacher(nn.Linear(4, 3))
        >>> teacher(torch.ones(2, 4)).requires_grad, teacher.model.training
        (False, False)
    """

    def __init__(self, model: nn.Module, script: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TRPError(f"a teacher must be an nn.Module, got {type(model).__name__}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            # Channels-last convs: on the 2-core reference CPU a ResNet-20 teacher (BN folded) runs batch 128
            # in 0.8x the time of the default layout; inputs are converted by the first conv.
            self.model.to(memory_format=torch.channels_last)
        self.graph: torch.jit.ScriptModule | None = None  # the traced teacher, once the first batch has come
        self._try_script = bool(script)

    def _trace(self, x: Tensor) -> tuple[torch.jit.ScriptModule | None, Tensor]:
        """The teacher as an optimized frozen graph if it traces and agrees with eager mode on ``x`` (else
        None), and its output on ``x``: the graph's when it is kept (tracing, the graph and eager mode
        run once each)."""
        try:
            graph = conversions.frozen_trace(self.model, x, optimize=True)
            got, want = graph(x), self.model(x)
            same = torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3)
        except Exception:  # an op or a Python control flow the tracer cannot capture, a non-tensor output
            return None, self.model(x)
        return (graph, got) if same else (None, want)

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        # eval() again: a caller's model.train() on a containing module must not put BatchNorm in batch mode.
        self.model.eval()
        if self._try_script and x.device.type == "cpu":
            self._try_script = False
            self.graph, out = self._trace(x)
        else:
            out = (self.graph if self.graph is not None else self.model)(x)
        return out.clone()  # clone: a normal tensor, usable in the autograd graph of the student's loss
