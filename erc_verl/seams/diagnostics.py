"""Opt-in per-token diagnostics: a random sample of response tokens per loss call, written as JSONL.

The paper's analysis figures (1a, 3, 4 and the clip-fraction comparison of section 5) plot single
tokens: their sampled probability, entropy, entropy ratio and whether PPO-clip or ERC clipped them.
Training metrics are batch means and cannot show that, so the actor loss can hand its tensors to a
:class:`TokenDiagnostics`, which keeps a bounded random sample and appends it to one file per process.

Off by default and free when off: :func:`maybe_diagnostics` returns ``None`` unless
``erc_diagnostics.dir`` is set, and the caller skips the call. When on, the work per call is one
``nonzero`` over the response mask and a gather of ``tokens_per_step`` values under ``torch.no_grad``;
only the sampled values move to the CPU.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from erc_verl.algorithm.gate import entropy_ratio
from erc_verl.algorithm.losses import config_value, erc_bounds_from_config

logger = logging.getLogger(__name__)

FILE_PREFIX = "tokens-"
FILE_SUFFIX = ".jsonl"

_DEFAULT_CLIP_RATIO_C = 3.0  # verl's default for dual-clip PPO


@dataclass(frozen=True)
class ClipBounds:
    """The PPO-clip and ERC bounds a token is judged against (read once from the actor config)."""

    clip_low: float
    clip_high: float
    clip_c: float
    erc_low: float
    erc_high: float

    @classmethod
    def from_config(cls, config: Any) -> "ClipBounds":
        clip_ratio = config_value(config, "clip_ratio", 0.2)
        erc = erc_bounds_from_config(config)
        return cls(
            clip_low=float(config_value(config, "clip_ratio_low", clip_ratio)),
            clip_high=float(config_value(config, "clip_ratio_high", clip_ratio)),
            clip_c=float(config_value(config, "clip_ratio_c", _DEFAULT_CLIP_RATIO_C)),
            erc_low=float(erc.low),
            erc_high=float(erc.high),
        )


@torch.no_grad()
def ppo_clipped_mask(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, bounds: ClipBounds):
    """Tokens whose PPO-clip term has no gradient: the same tests verl's ``vanilla`` uses for its metrics.

    ``pg_clipfrac``: A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low; ``pg_clipfrac_lower``
    (dual clip): A < 0 and r > clip_ratio_c. The log-ratio is clamped to [-20, 20] as in verl.
    """
    ratio = torch.exp(torch.clamp(log_prob.float() - old_log_prob.float(), min=-20.0, max=20.0))
    adv = advantages.float()
    upper = (adv > 0) & (ratio > 1.0 + bounds.clip_high)
    lower = (adv < 0) & (ratio < 1.0 - bounds.clip_low)
    dual = (adv < 0) & (ratio > bounds.clip_c)
    return upper | lower | dual, ratio


class TokenDiagnostics:
    """Samples response tokens per loss call and appends them to ``{dir}/tokens-rank{r}-pid{p}.jsonl``.

    One file per process (rank and pid in the name; a ``.N`` suffix if that name already exists,
    e.g. a restarted container that reuses a pid), so ranks and restarts never write to the same file.
    A record:

    ``call`` (loss-call index in this process), ``rank``, ``prob`` / ``old_prob`` (sampled token's
    probability under the current / old policy), ``ratio`` (importance ratio), ``entropy`` /
    ``old_entropy``, ``entropy_ratio``, ``advantage``, ``adv_sign`` (-1, 0, 1), ``ppo_clipped``,
    ``erc_clipped`` (the gate dropped the gradient: ``keep`` was False), ``erc_direction``
    ("upper", "lower" or "" when kept).
    """

    def __init__(self, config: Any, rank: int = 0):
        directory = config_value(config, "dir")
        if not directory:
            raise ValueError(
                "TokenDiagnostics needs erc_diagnostics.dir; use erc_verl.seams.diagnostics.maybe_diagnostics(config, rank), "
                "which returns None when diagnostics are off."
            )
        self.dir = os.fspath(directory)
        self.tokens_per_step = int(config_value(config, "tokens_per_step", 256))
        self.max_records = int(config_value(config, "max_records", 200_000))
        if self.tokens_per_step <= 0 or self.max_records <= 0:
            raise ValueError(
                "erc_diagnostics.tokens_per_step and .max_records must be positive, got "
                f"{self.tokens_per_step} and {self.max_records}."
            )
        self.rank = int(rank)
        self.calls = 0
        self.written = 0
        self.path: Optional[str] = None
        self._file = None
        self._warned_full = False
        self._generator = torch.Generator(device="cpu")
        # Distinct, reproducible streams per rank.
        self._generator.manual_seed(int(config_value(config, "seed", 0)) * 100_003 + self.rank)

    # -- file handling -------------------------------------------------------------------------
    def _open(self):
        os.makedirs(self.dir, exist_ok=True)
        stem = f"{FILE_PREFIX}rank{self.rank}-pid{os.getpid()}"
        for attempt in range(10_000):
            name = stem + (f".{attempt}" if attempt else "") + FILE_SUFFIX
            path = os.path.join(self.dir, name)
            try:
                self._file = open(path, "x", encoding="utf-8")  # exclusive: never append to another run's file
            except FileExistsError:
                continue
            self.path = path
            return
        raise RuntimeError(f"TokenDiagnostics: could not create a new file for {stem} in {self.dir}.")

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):  # best effort; records are flushed after every call anyway
        try:
            self.close()
        except Exception:
            pass

    # -- recording -----------------------------------------------------------------------------
    @torch.no_grad()
    def record(
        self,
        *,
        log_prob: torch.Tensor,
        old_log_prob: torch.Tensor,
        entropy: torch.Tensor,
        old_entropy: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        keep: torch.Tensor,
        config: Any,
    ) -> int:
        """Append up to ``tokens_per_step`` random valid tokens of this call; returns how many were written."""
        call = self.calls
        self.calls += 1
        remaining = self.max_records - self.written
        if remaining <= 0:
            if not self._warned_full:
                logger.warning(
                    "ERC token diagnostics: %s reached erc_diagnostics.max_records=%d; not writing more.",
                    self.path or self.dir,
                    self.max_records,
                )
                self._warned_full = True
            return 0

        shapes = {t.shape for t in (log_prob, old_log_prob, entropy, old_entropy, advantages, response_mask, keep)}
        if len(shapes) != 1:
            raise ValueError(
                "TokenDiagnostics.record: log_prob, old_log_prob, entropy, old_entropy, advantages, response_mask and "
                f"keep must share one (batch, response_length) shape, got {sorted(tuple(s) for s in shapes)}."
            )

        valid = response_mask.bool().reshape(-1).nonzero(as_tuple=True)[0]
        n_valid = valid.numel()
        k = min(self.tokens_per_step, n_valid, remaining)
        if k == 0:
            return 0
        pick = torch.randperm(n_valid, generator=self._generator)[:k].to(valid.device)
        idx = valid[pick]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.detach().reshape(-1)[idx]

        bounds = ClipBounds.from_config(config)
        lp, olp, adv = take(log_prob), take(old_log_prob), take(advantages)
        ent, old_ent = take(entropy), take(old_entropy)
        ppo_clipped, ratio = ppo_clipped_mask(lp, olp, adv, bounds)
        rho = entropy_ratio(ent, old_ent)
        kept = take(keep).bool()
        columns = {
            "prob": torch.exp(lp.float()),
            "old_prob": torch.exp(olp.float()),
            "ratio": ratio,
            "entropy": ent.float(),
            "old_entropy": old_ent.float(),
            "entropy_ratio": rho,
            "advantage": adv.float(),
            "ppo_clipped": ppo_clipped,
            "kept": kept,
            "above": rho >= bounds.erc_high,
        }
        # 7 significant digits: float32 precision, about half the bytes of repr(float).
        cpu = {name: t.cpu().tolist() for name, t in columns.items()}
        for name in ("prob", "old_prob", "ratio", "entropy", "old_entropy", "entropy_ratio", "advantage"):
            cpu[name] = [float(f"{v:.7g}") for v in cpu[name]]

        if self._file is None:
            self._open()
        lines = []
        for i in range(k):
            erc_clipped = not cpu["kept"][i]
            adv_i = cpu["advantage"][i]
            lines.append(
                json.dumps(
                    {
                        "call": call,
                        "rank": self.rank,
                        "prob": cpu["prob"][i],
                        "old_prob": cpu["old_prob"][i],
                        "ratio": cpu["ratio"][i],
                        "entropy": cpu["entropy"][i],
                        "old_entropy": cpu["old_entropy"][i],
                        "entropy_ratio": cpu["entropy_ratio"][i],
                        "advantage": adv_i,
                        "adv_sign": (adv_i > 0) - (adv_i < 0),
                        "ppo_clipped": bool(cpu["ppo_clipped"][i]),
                        "erc_clipped": erc_clipped,
                        "erc_direction": ("upper" if cpu["above"][i] else "lower") if erc_clipped else "",
                    },
                    separators=(",", ":"),
                )
            )
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        self.written += k
        return k


def maybe_diagnostics(config: Any, rank: int = 0) -> Optional[TokenDiagnostics]:
    """A :class:`TokenDiagnostics` when ``config.dir`` is set, else ``None`` (the caller then does nothing).

    ``config`` is the ``erc_diagnostics`` section (``ERCDiagnosticsConfig`` or a dict), or None.
    """
    if config is None or not config_value(config, "dir"):
        return None
    return TokenDiagnostics(config, rank=rank)
