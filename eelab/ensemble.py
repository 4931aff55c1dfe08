"""Ensembled exits (Zero Time Waste, Wołczyk et al. 2021): exit k combines the log-probabilities of exits 0..k.

A geometric ensemble, as a transform of exit records: the ensembled output of exit k is

    z_k = sum_{j <= k} w[k, j] * log_softmax(logits_j) + b[k]          w [K, K] >= 0, lower-triangular; b [K, C]

so a later exit re-uses what earlier exits computed instead of throwing it away. An ensembled record is an exit
record again (every policy, sweep, plot and frontier works on it unchanged) whose meta names the ensemble by the
sha256 of its weights; the fitted-policy cache and the same-model checks compare that name, so plain and
ensembled fits never mix.

Splits: the ensemble is fitted on a seeded half of the cal split (`split_cal`); `apply` drops those rows from
any cal record it transforms, so the policies (thresholds, risk control's Learn-then-Test and CRC) are fitted on
the other half only, on scores that do not depend on the data their guarantee is computed on. Test is only ever
scored. Exit 0 has nothing to combine with: its w[0, 0] and b[0] only rescale and shift its own log-probabilities
(a temperature and a per-class bias), which changes its calibration, not much its accuracy.

Live inference keeps each image's log-probabilities of the exits it passed (`combine`), so an image leaving at
exit k gets the same z_k as the ensembled record (tested to 1e-4).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .data import check_seed
from .errors import EelabError
from .files import check_output, load_tagged, save_torch
from .records import ExitRecord, check_same_source

FORMAT = "eelab.exit_ensemble"
FORMAT_VERSION = 1
_FIX = "fit it again with `eelab ensemble CAL --out FILE` (or eelab.fit_ensemble)"


@dataclass(frozen=True)
class ExitEnsemble:
    """A fitted geometric ensemble of exits: weights [K, K] (w[k, j] >= 0 for j <= k, 0 above the diagonal),
    bias [K, C], and where it was fitted (checkpoint hash, split, the cal indices it used, seed)."""

    weights: torch.Tensor
    bias: torch.Tensor
    fit_indices: torch.Tensor
    info: dict[str, Any]

    def __post_init__(self) -> None:
        w, b = self.weights, self.bias
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or w.ndim != 2 or b.ndim != 2 \
                or w.shape[0] != w.shape[1] or b.shape[0] != w.shape[0] or w.shape[0] < 1 or b.shape[1] < 1:
            raise EelabError(f"an exit ensemble needs weights [K, K] and bias [K, C], got "
                             f"{_shape(w)} and {_shape(b)}; {_FIX}")
        if not (w.is_floating_point() and b.is_floating_point()) \
                or not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(b).all()):
            raise EelabError(f"an exit ensemble's weights and bias must be finite floats; {_FIX}")
        if bool((w < 0).any()) or bool(torch.triu(w, diagonal=1).ne(0).any()):
            raise EelabError(f"an exit ensemble's weights must be >= 0 and lower-triangular (exit k combines exits "
                             f"0..k only, never a later one); {_FIX}")
        if not isinstance(self.fit_indices, torch.Tensor) or self.fit_indices.ndim != 1 \
                or self.fit_indices.is_floating_point() or self.fit_indices.is_complex() \
                or self.fit_indices.dtype == torch.bool:
            raise EelabError(f"an exit ensemble's fit_indices must be int64 [n]; {_FIX}")
        object.__setattr__(self, "weights", w.double())
        object.__setattr__(self, "bias", b.double())
        object.__setattr__(self, "fit_indices", self.fit_indices.long())

    @property
    def k(self) -> int:
        """K, the number of exits."""
        return self.weights.shape[0]

    @property
    def c(self) -> int:
        """C, the number of classes."""
        return self.bias.shape[1]

    @property
    def sha256(self) -> str:
        """The ensemble's identity: sha256 of its weights, bias, the cal rows it was fitted on and its info (the
        checkpoint and split it belongs to)."""
        h = hashlib.sha256()
        for t in (self.weights, self.bias, self.fit_indices):
            h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps(self.info, sort_keys=True, default=str).encode())
        return h.hexdigest()

    @property
    def source(self) -> dict[str, Any]:
        """The checkpoint it was fitted for, for records.check_same_source (it takes plain exits of that network)."""
        return {"checkpoint_sha256": self.info.get("checkpoint_sha256")}

    def extra_macs(self) -> torch.Tensor:
        """MACs one sample spends on the combination up to exit k: float64 [K], cumulative.

        Exit j's combination is (j + 1) * C multiply-adds (its log-softmax is not counted, nor is a head's)."""
        per_exit = torch.arange(1, self.k + 1, dtype=torch.float64) * self.c
        return per_exit.cumsum(0)

    def combine(self, k: int, logits_k: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Live step at exit k for B running samples: logits_k [B, C], past log-probs [B, k, C] (None at k = 0)
        -> (ensembled logits z_k [B, C] fp32, past [B, k + 1, C] for exit k + 1)."""
        logp = torch.log_softmax(logits_k.float(), dim=-1).unsqueeze(1)
        past = logp if past is None else torch.cat([past, logp], dim=1)
        w = self.weights[k, :k + 1].float()
        z = torch.einsum("j,bjc->bc", w, past) + self.bias[k].float()
        return z, past

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Ensembled logits of every exit at once: logits [N, K, C] -> z [N, K, C] fp32 (what combine gives)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        return torch.einsum("kj,njc->nkc", self.weights.float(), logp) + self.bias.float()[None]

    def apply(self, record: ExitRecord, what: str = "record") -> ExitRecord:
        """The record with ensembled logits, costs counting the combination, and the ensemble named in its meta.

        Rows of the cal split the ensemble was fitted on are dropped (a policy fitted on the result never sees
        them); a record of another model, or one already ensembled, is refused in one line naming `what`.
        """
        self.check_record(record, what)
        if "ensemble_sha256" in record.meta:
            raise EelabError(f"the {what} is already ensembled; apply the ensemble to the plain record")
        keep = None
        if record.meta.get("split") == self.info.get("split"):
            keep = ~torch.isin(record.indices, self.fit_indices)
            if not bool(keep.any()):
                raise EelabError(f"every row of this {record.meta.get('split') or 'cal'} record was used to fit the "
                                 f"ensemble; the policies need the other part of cal")
            record = record.subset(keep) if not bool(keep.all()) else record
        dropped = 0 if keep is None else int((~keep).sum())
        meta = {**record.meta, "ensemble_sha256": self.sha256,
                "ensemble": {"fit_rows": int(self.fit_indices.numel()), "rows_dropped": dropped,
                             "seed": self.info.get("seed"), "split": self.info.get("split")}}
        return replace(record, logits=self.transform_logits(record.logits), costs=record.costs + self.extra_macs(),
                       meta=meta)

    def check_record(self, record: ExitRecord, what: str = "record") -> None:
        """One-line EelabError unless the record comes from the model the ensemble was fitted for."""
        if record.k != self.k or record.c != self.c:
            raise EelabError(f"the ensemble was fitted on K={self.k} exits and C={self.c} classes, the {what} has "
                             f"K={record.k}, C={record.c}; fit an ensemble on this model's cal record")
        check_same_source(self.source, record.source, "the ensemble", f"the {what}",
                          "fit an ensemble on this model's cal record")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the ensemble as a small torch file, atomically; a file of another kind is refused unless overwrite."""
        check_output(path, "exit ensemble", overwrite, option="ensemble file")
        return save_torch({"format": FORMAT, "format_version": FORMAT_VERSION, "weights": self.weights,
                           "bias": self.bias, "fit_indices": self.fit_indices, "info": dict(self.info),
                           "sha256": self.sha256}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ExitEnsemble":
        """Read an ensemble file; one-line EelabError for a missing, truncated, foreign or altered file."""
        d = load_tagged(path, FORMAT, FORMAT_VERSION, "exit ensemble", _FIX)
        if not all(isinstance(d.get(key), torch.Tensor) for key in ("weights", "bias", "fit_indices")) \
                or not isinstance(d.get("info"), dict) or any(d[key].is_complex() for key in ("weights", "bias")):
            raise EelabError(f"{path} lacks the weights, bias, fit_indices or info of an exit ensemble; {_FIX}")
        try:
            ens = cls(d["weights"], d["bias"], d["fit_indices"], dict(d["info"]))
        except EelabError as e:
            raise EelabError(f"{path}: {e}") from None
        if d.get("sha256") != ens.sha256:
            raise EelabError(f"{path}: its weights do not match the hash saved with them (the file was altered); "
                             f"{_FIX}")
        return ens


def identity_ensemble(k: int, c: int) -> ExitEnsemble:
    """The ensemble that gives each exit its own log-probabilities (w = I, b = 0): the plain record's
    probabilities and decisions, up to a per-row shift of the logits."""
    return ExitEnsemble(torch.eye(k, dtype=torch.float64), torch.zeros(k, c, dtype=torch.float64),
                        torch.empty(0, dtype=torch.long), {"split": None, "seed": None})


def split_cal(cal: ExitRecord, seed: int = 0, fraction: float = 0.5) -> tuple[ExitRecord, ExitRecord]:
    """A seeded split of a cal record into (part the ensemble is fitted on, part the policies are fitted on).

    fraction: the ensemble's share of cal rows, in (0, 1); both parts keep record order.
    """
    check_seed(seed)
    if not 0 < fraction < 1:
        raise EelabError(f"the ensemble's share of cal must be in (0, 1), got {fraction}")
    n_fit = int(round(cal.n * fraction))
    if n_fit < 1 or n_fit >= cal.n:
        raise EelabError(f"a cal record of {cal.n} samples cannot be split {fraction:g} / {1 - fraction:g}; "
                         f"record more cal samples")
    perm = torch.randperm(cal.n, generator=torch.Generator().manual_seed(seed))
    return cal.subset(perm[:n_fit].sort().values), cal.subset(perm[n_fit:].sort().values)


def fit_ensemble(cal: ExitRecord, seed: int = 0, fraction: float = 0.5, steps: int = 300) -> ExitEnsemble:
    """Fit a geometric ensemble of exits on a seeded part of a cal record (split_cal) -> ExitEnsemble.

    Minimises each exit's cross-entropy of z_k over (w[k, :k+1] >= 0, b[k]) on that part: convex in (w, b), so
    full-batch L-BFGS on w = softplus(u) from the identity (w = I, b = 0) reaches the same answer from any seed
    of the split; deterministic given the split.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EelabError(f"ensemble fitting needs steps >= 1, got {steps!r}")
    part, _ = split_cal(cal, seed, fraction)
    k, c = cal.k, cal.c
    logp = torch.log_softmax(part.logits.double(), dim=-1)  # [n, K, C]
    labels = part.labels
    lower = torch.tril(torch.ones(k, k, dtype=torch.bool))
    # softplus(u) = 1 on the diagonal, ~0.007 below it: start at the plain record
    u = torch.where(torch.eye(k, dtype=torch.bool), torch.tensor(0.5413248546129181, dtype=torch.float64),
                    torch.tensor(-5.0, dtype=torch.float64)).requires_grad_(True)
    b = torch.zeros(k, c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        w = torch.nn.functional.softplus(u) * lower
        z = torch.einsum("kj,njc->nkc", w, logp) + b[None]
        loss = torch.nn.functional.cross_entropy(z.reshape(-1, c), labels.repeat_interleave(k), reduction="sum")
        loss = loss / part.n
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        w = torch.nn.functional.softplus(u) * lower
    if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(b).all()):
        raise EelabError("fitting the exit ensemble produced a non-finite weight; check the cal record")
    fit_idx = part.indices.clone()
    info = {"checkpoint_sha256": cal.meta.get("checkpoint_sha256"), "split": cal.meta.get("split"),
            "seed": seed, "fraction": fraction, "n_fit": part.n, "n_cal": cal.n,
            "precision": cal.meta.get("precision", "fp32"), "model": cal.meta.get("model"),
            "dataset": cal.meta.get("dataset")}
    return ExitEnsemble(w.detach(), b.detach(), fit_idx, info)


def load_ensemble(path: str | Path) -> ExitEnsemble:
    """Read an ensemble file (see ExitEnsemble.load)."""
    return ExitEnsemble.load(path)


def ensemble_for(ensemble: "str | Path | ExitEnsemble | None", policy_source: dict[str, Any], num_exits: int,
                 num_classes: int, checkpoint_sha256: str | None = None) -> ExitEnsemble | None:
    """The ensemble a live runner uses (a file is loaded), checked against the network it runs with (K, C, the
    checkpoint hash where both know it), and the policy (Policy.source) against the outputs it then decides on:
    that network's, plain or through this ensemble (records.check_same_source). One-line EelabError otherwise.
    None stays None (after the policy check)."""
    if ensemble is not None and not isinstance(ensemble, ExitEnsemble):
        ensemble = load_ensemble(ensemble)
    network = {"checkpoint_sha256": checkpoint_sha256}
    if ensemble is not None:
        if ensemble.k != num_exits or ensemble.c != num_classes:
            raise EelabError(f"the ensemble was fitted on K={ensemble.k} exits and C={ensemble.c} classes, this model "
                             f"has K={num_exits}, C={num_classes}; fit one on its cal record")
        check_same_source(ensemble.source, network, "the ensemble", "this model",
                          "fit one on this checkpoint's cal record")
    outputs = {**network, "ensemble_sha256": ensemble.sha256 if ensemble is not None else None}
    check_same_source(policy_source, outputs, "the policy", "this model's outputs",
                      "refit it on this checkpoint's cal record")
    return ensemble


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


__all__ = ["ExitEnsemble", "ensemble_for", "fit_ensemble", "identity_ensemble",
           "load_ensemble", "split_cal"]
