"""METHOD.md's fusion score: how the two branches' queries are blended and scored against the gallery.

The gallery stores both branches' target tokens once per image, ``t = [t_gm ; t_di] / sqrt 2`` [N, Nq, 2D]. With a
branch's max-sim score ``s_b(q_b, k) = max_j <q_b, t_b,k,j>`` and weights ``(a_gm, a_di)``:

- ``branch_max`` (default): ``s(k) = a_gm s_gm(q_gm, k) + a_di s_di(q_di, k)``, each branch its own max over its own
  tokens. The unified query is ``u = sqrt 2 [a_gm q_gm ; a_di q_di]``; a score takes one max per half of ``u``.
- ``joint_max``: ``u = [sqrt(a_gm) q_gm ; sqrt(a_di) q_di]``, ``s(k) = max_j <u, t_k,j>``: one max over token j of both
  branches together (pairs token j of one Q-Former with token j of the other); kept for the ablation.

Scores are fp32 (also under autocast). Any unified query [B, 2D] (e.g. concat_linear's) is scored by the same rule.
"""

from __future__ import annotations

import math

import torch

from detailfusion.library.errors import ConfigError

FUSION_SCORES = ("branch_max", "joint_max")


def check_rule(rule: str) -> str:
    if rule not in FUSION_SCORES:
        raise ConfigError(f"unknown fusion_score {rule!r}; known: {', '.join(FUSION_SCORES)}")
    return rule


def fused_query(q_gm: torch.Tensor, q_di: torch.Tensor, weights: torch.Tensor, rule: str) -> torch.Tensor:
    """Branch features [B, D] x 2 and weights [B, 2] (summing to 1) -> the unified query [B, 2D] of ``rule``."""
    a = weights.clamp(min=0)
    if check_rule(rule) == "joint_max":
        a = a.sqrt()
    else:
        a = a * math.sqrt(2.0)
    return torch.cat([a[:, :1] * q_gm, a[:, 1:] * q_di], dim=-1)


def fused_scores(queries: torch.Tensor, gallery: torch.Tensor, rule: str) -> torch.Tensor:
    """Unified queries [B, 2D] against gallery embeddings [N, Nq, 2D] -> scores [B, N] (fp32)."""
    with torch.autocast(queries.device.type, enabled=False):
        queries, gallery = queries.float(), gallery.float()
        if check_rule(rule) == "joint_max":
            return torch.einsum("bd,nkd->bnk", queries, gallery).amax(dim=-1)
        half = queries.shape[-1] // 2
        gm = torch.einsum("bd,nkd->bnk", queries[:, :half], gallery[..., :half]).amax(dim=-1)
        di = torch.einsum("bd,nkd->bnk", queries[:, half:], gallery[..., half:]).amax(dim=-1)
        return gm + di
