"""Selective entropy distillation (METHOD.md, cloud step 4): how the student learns from the teacher.

Each term is weighted per sample by a constant exp(E0 - H): the student's own entropy term by the
student's confidence (a), the two teacher-matching terms by the teacher's confidence (b), so
unreliable teacher outputs barely move the student. Weights are not normalised, as in the authors' code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cema_ray.algorithms.entropy import entropy, reweight


def selective_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, e0: float,
                                alpha: float = 3.0, beta: float = 3.0, gamma: float = 1.0,
                                tau: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L = alpha*mean[a*H(s)] + beta*mean[b*tau^2*KL(softmax(t/tau)||softmax(s/tau))] + gamma*mean[b*CE(s, argmax t)].

    Returns the loss and its unweighted parts (floats) for logging. The teacher gets no gradient.
    """
    t = teacher_logits.detach()
    h_s = entropy(student_logits)
    a = reweight(h_s, e0)
    b = reweight(entropy(t), e0)
    log_p_t = F.log_softmax(t / tau, dim=1)
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * tau ** 2
    ce = F.cross_entropy(student_logits, t.argmax(dim=1), reduction="none")
    ent_term, kl_term, ce_term = (a * h_s).mean(), (b * kl).mean(), (b * ce).mean()
    loss = alpha * ent_term + beta * kl_term + gamma * ce_term
    parts = {k: float(v.detach()) for k, v in
             (("entropy", ent_term), ("kl", kl_term), ("ce", ce_term), ("loss", loss))}
    return loss, parts
