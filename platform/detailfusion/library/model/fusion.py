"""METHOD.md's fusion score: how the two branches' queries are blended and scored against the gallery.

The gallery stores both branches' target tokens once per image, ``t = [t_gm ; t_di] / sqrt 2`` [N, Nq, 2D]. With a
branch's max-sim score ``s_b(q_b, k) = max_j <q_b, t_b,k,j>`` and weights ``(a_gm, a_di)``:

- ``branch_max`` (default): ``s(k) = a_gm s_gm(q_gm, k) + a_di s_di(q_di, k)``, each branch its own max over its own
  tokens. The unified query is ``u = sqrt 2 [a_gm q_gm ; a_di q_di]``; a score takes one max per half of ``u``.
- ``joint_max``: ``u = [sqrt(a_gm) q_gm ; sqrt(a_di) q_di]``, ``s(k) = max_j <u, t_k,j>``: one max over token j of both
  branches together (pairs token j of one Q-Former with token j of the other); kept for the ablation.

Scores are fp32 (also under autocast). Any unified query [B, 2D] (e.g. concat_linear's) is scored by the same rule.
The rules are ``FusionRule`` entries of ``FUSION_RULES``: a new one is one registration (``register``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from detailfusion.library.registry import Registry

DEFAULT_FUSION_RULE = "branch_max"  # METHOD.md's; also the rule of configs and indexes written before the key


@dataclass(frozen=True)
class FusionRule:
    """How a unified query u [B, 2D] is made from the branch queries and scored against gallery tokens [N, Nq, 2D].

    scale: weights (a_gm, a_di) [B, 2] (clamped at 0) -> the factor [B, 2] each branch's query takes in u.
    joint: True: one max over token j of both halves together (``s(k) = max_j <u, t_k,j>``); False: one max per
        branch half over that half's tokens, summed. The compressed index searches ``parts(2D)`` apart (one FAISS
        index each) and the exact index prunes by token hits only for a joint rule.
    """

    scale: Callable[[torch.Tensor], torch.Tensor]
    joint: bool

    def parts(self, width: int) -> tuple[slice, ...]:
        """The column slices of a unified vector [width = 2D] each scored by its own max over tokens."""
        return (slice(0, width),) if self.joint else (slice(0, width // 2), slice(width // 2, width))

    def query(self, q_gm: torch.Tensor, q_di: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Branch features [B, D] x 2 and weights [B, 2] (summing to 1) -> the unified query [B, 2D]."""
        a = self.scale(weights.clamp(min=0))
        return torch.cat([a[:, :1] * q_gm, a[:, 1:] * q_di], dim=-1)

    def scores(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Unified queries [B, 2D] against gallery embeddings [N, Nq, 2D] -> scores [B, N] (fp32, also under
        autocast)."""
        with torch.autocast(queries.device.type, enabled=False):
            queries, gallery = queries.float(), gallery.float()
            return sum(torch.einsum("bd,nkd->bnk", queries[:, part], gallery[..., part]).amax(dim=-1)
                       for part in self.parts(queries.shape[-1]))


def _times_sqrt2(weights: torch.Tensor) -> torch.Tensor:
    return weights * math.sqrt(2.0)


FUSION_RULES: Registry[FusionRule] = Registry("fusion rule", __name__)
FUSION_RULES.register("branch_max", FusionRule(_times_sqrt2, joint=False))
FUSION_RULES.register("joint_max", FusionRule(torch.sqrt, joint=True))


def fusion_rule(name: str, where: str = "fusion_score") -> FusionRule:
    return FUSION_RULES.get(name, where)


def check_rule(name: str) -> str:
    return FUSION_RULES.check(name, "fusion_score")


def fused_query(q_gm: torch.Tensor, q_di: torch.Tensor, weights: torch.Tensor, rule: str) -> torch.Tensor:
    """Branch features [B, D] x 2 and weights [B, 2] (summing to 1) -> the unified query [B, 2D] of ``rule``."""
    return fusion_rule(rule).query(q_gm, q_di, weights)


def fused_scores(queries: torch.Tensor, gallery: torch.Tensor, rule: str) -> torch.Tensor:
    """Unified queries [B, 2D] against gallery embeddings [N, Nq, 2D] -> scores [B, N] (fp32)."""
    return fusion_rule(rule).scores(queries, gallery)
