"""The `eelab` command: thin over the package. Errors are one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, replace
from pathlib import Path
from typing import Any, Callable

from .errors import EelabError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _print_json(obj: Any) -> None:
    """The one JSON printer: strict JSON (NaN and infinities as null, see _json_safe)."""
    sys.stdout.write(json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def _shared(*args: str, **kw: Any) -> argparse.ArgumentParser:
    """A parent parser (argparse parents=) holding one flag that several subcommands share."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(*args, **kw)
    return p


_THREADS = _shared("--threads", type=int, metavar="N", help="torch CPU threads")
_JSON = _shared("--json", action="store_true", help="print the result as JSON on stdout")
_QUIET = _shared("--quiet", action="store_true", help="no progress bars")
_CAL = _shared("--cal", help="cal record to fit on (default: cal.pt beside RECORD)")
_ENSEMBLE = _shared("--ensemble", metavar="FILE", help="exit ensemble file (eelab ensemble) to combine the exits with; "
                                                      "cal rows it was fitted on are left out of any policy fit")
_OVERWRITE = _shared("--overwrite", action="store_true", help="replace what the output path holds (another run, or a "
                                                              "file of another kind)")


def _subcommand(sub: Any, run: Callable[[argparse.Namespace], int],
                *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The subcommand `run` implements (_run_NAME): its --help from run's docstring (first line, then the rest)."""
    summary, _, details = (run.__doc__ or "").partition("\n\n")
    p = sub.add_parser(run.__name__.removeprefix("_run_"), parents=list(parents), help=summary.strip(),
                       description=" ".join(details.split()) or summary.strip())
    p.set_defaults(run=run)
    return p


def _policy_names() -> str:
    from .policies import POLICIES

    return ", ".join(POLICIES)


# ----------------------------------------------------------------------------- train

def _add_train(sub) -> None:
    from .training import train_options

    p = _subcommand(sub, _run_train, _THREADS, _QUIET, _JSON, _OVERWRITE)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; an "
                                                         "option given must equal the run's")
    p.add_argument("--half-weights", action="store_true", help="store model.pt in fp16 (evaluation stays fp32)")
    group = p.add_argument_group("run options", "fields of TrainConfig and its ModelConfig (eelab.training, "
                                                "eelab.models); those not given keep their defaults, or on "
                                                "--resume the run's values")
    for o in train_options():
        group.add_argument(o.flag, dest=_dest(o), default=None, **_option_kwargs(o))


def _dest(o) -> str:
    """Namespace attribute of a run option: its flag's name (a --no- switch: the field's name)."""
    return o.field.name if o.flag.startswith("--no-") else o.flag[2:].replace("-", "_")


def _option_kwargs(o) -> dict[str, Any]:
    """argparse keywords of a run option, from its dataclass field: parser, metavar, help with the default."""
    f = o.field
    default = f.default if f.default is not MISSING else f.default_factory()
    text = f.metadata.get("help", "")
    if o.kind is bool:  # a switch that flips the default
        return {"action": "store_false" if default else "store_true",
                "help": f"turn off: {text}" if default else text}
    choices = f.metadata.get("choices")
    metavar = f.metadata.get("metavar") or ("{" + ",".join(choices) + "}" if choices else None)
    shown = "" if default is None else f" (default: {_show(default)})"
    return {"type": _parse_as(o.kind), "metavar": metavar, "help": (text + shown).replace("%", "%%")}


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _parse_as(kind: Any) -> Callable[[str], Any]:
    """argparse type of a field type: int, float or str, or comma-separated values for tuple[T, ...]; T | None
    as T."""
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if typing.get_origin(kind) is tuple:
        return functools.partial(_items, typing.get_args(kind)[0])
    return kind


def _items(item: type, text: str) -> tuple:
    """Comma-separated values of one type: 0.5,1 (floats), 64,128 (positive whole numbers), layer1,layer2."""
    try:
        values = tuple(item(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or (item is int and any(v < 1 for v in values)):
        what = {float: "numbers", int: "positive whole numbers"}.get(item, "names")
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return values


_EXIT_PLACEMENT = ("exits_after", "exits_schedule", "num_exits")


def _run_train(a: argparse.Namespace) -> int:
    """train a multi-exit network into a checkpoint directory

    Train all exits jointly (or heads only on a frozen backbone, or the plain network only); a checkpoint is
    written after every epoch, --resume continues an interrupted run. CEED's two steps: --plain --out A, then
    --heads-only --init A --loss-weights 1,..,1,0 --out B. Under torchrun it trains with DistributedDataParallel
    (--batch-size is the global batch).
    """
    from .checkpoint import read_checkpoint_config, read_history
    from .training import TrainConfig, train, train_options

    # the asked config: defaults (or, on --resume, the run's saved config) with the given options replaced;
    # train() refuses a resume whose asked config differs from the saved one
    given = [(o, getattr(a, _dest(o))) for o in train_options() if getattr(a, _dest(o)) is not None]
    base = TrainConfig.from_dict(read_checkpoint_config(a.out)["train"]) if a.resume else TrainConfig()
    model = {o.field.name: v for o, v in given if o.in_model}
    if model.keys() & set(_EXIT_PLACEMENT):  # exits are placed by one of these; a saved run holds them placed
        model = {**dict.fromkeys(_EXIT_PLACEMENT), **model}
    cfg = replace(base, model=replace(base.model, **model), **{o.field.name: v for o, v in given if not o.in_model})
    if a.resume and a.overwrite:
        raise EelabError("--resume continues the run in --out and --overwrite replaces it; choose one")
    out = train(cfg, a.out, resume=a.resume, progress=not a.quiet, half_weights=a.half_weights,
                overwrite=a.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 alone reports
    if a.json:
        conf = read_checkpoint_config(out)
        _print_json({"out": str(out), "history": read_history(out), "costs": conf["costs"],
                     "full_cost": conf["full_cost"]})
    else:
        print(f"checkpoint written to {out}")
    return 0


# ----------------------------------------------------------------------------- record

def _add_record(sub) -> None:
    p = _subcommand(sub, _run_record, _THREADS, _QUIET, _JSON, _OVERWRITE)
    p.add_argument("checkpoint", help="checkpoint directory (eelab train --out)")
    p.add_argument("--split", required=True, choices=["cal", "test"])
    p.add_argument("--out", required=True, help="record file to write (e.g. test.pt)")
    p.add_argument("--limit", type=int, help="only a seeded random subset of N samples of the split (in index order)")
    p.add_argument("--batch-size", type=int, default=500)
    _add_precision_option(p)


def _run_record(a: argparse.Namespace) -> int:
    """run a checkpoint once over a split and write its exit record

    One forward pass over the cal or test split; writes every exit's logits and costs (an ExitRecord)
    atomically. At --precision bf16 the record's meta says so, and policies fitted on it record it.
    """
    from .records import check_record_output, checkpoint_source, record_checkpoint

    if a.batch_size < 1:
        raise EelabError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.limit is not None and a.limit < 1:
        raise EelabError(f"--limit must be at least 1, got {a.limit}")
    # before the forward pass, not after it: the path, and no other checkpoint's model.pt beside it
    check_record_output(a.out, checkpoint_source(a.checkpoint), a.overwrite)
    rec = record_checkpoint(a.checkpoint, a.split, limit=a.limit, batch_size=a.batch_size, progress=not a.quiet,
                            precision=a.precision)
    rec.save(a.out, overwrite=a.overwrite)
    acc = (rec.logits.argmax(-1) == rec.labels[:, None]).double().mean(0).tolist()
    summary = {"out": str(a.out), "split": a.split, "shape": list(rec.logits.shape), "exit_accuracy": acc,
               "costs": rec.costs.tolist(), "full_cost": rec.full_cost, "precision": rec.meta["precision"]}
    if a.json:
        _print_json(summary)
    else:
        print(f"{a.out}: logits {tuple(rec.logits.shape)} ({rec.meta['precision']}); exit accuracy "
              + " ".join(f"{v:.4f}" for v in acc) + "; MACs " + " ".join(f"{c / 1e6:.1f}M" for c in rec.costs))
    return 0


# ----------------------------------------------------------------------------- ensemble

def _add_ensemble(sub) -> None:
    p = _subcommand(sub, _run_ensemble, _JSON, _OVERWRITE)
    p.add_argument("cal", help="cal record to fit on (eelab record ... --split cal)")
    p.add_argument("--out", required=True, help="ensemble file to write (e.g. ensemble.pt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cal split (default 0)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of cal the ensemble is fitted on, in (0, 1) "
                                                               "(default 0.5; the policies get the rest)")


def _run_ensemble(a: argparse.Namespace) -> int:
    """fit ensembled exits (Zero Time Waste) on part of a cal record

    Exit k then answers with a weighted sum of the log-probabilities of exits 0..k plus a per-class bias, the
    weights >= 0 fitted on a seeded part of CAL (--fraction). Pass the file as --ensemble to evaluate, sweep,
    predict and bench: cal rows it was fitted on are left out of every policy fit, so risk control's guarantee
    is computed on data the ensemble never saw. Prints per exit, on the held-out part of cal, the accuracy and
    calibration error before and after.
    """
    from .data import check_seed
    from .ensemble import fit_ensemble, split_cal
    from .files import check_output
    from .metrics import exit_calibration
    from .records import load_record

    check_seed(a.seed)
    check_output(a.out, "exit ensemble", a.overwrite)  # before the fit, not after it
    cal = load_record(a.cal)
    if "ensemble_sha256" in cal.meta:
        raise EelabError(f"{a.cal} is already ensembled; fit on the plain cal record")
    ens = fit_ensemble(cal, seed=a.seed, fraction=a.fraction)
    held = split_cal(cal, a.seed, a.fraction)[1]
    rows = [{"records": name, **exit_calibration(rec)}
            for name, rec in (("plain", held), ("ensembled", ens.apply(held)))]
    ens.save(a.out, overwrite=a.overwrite)
    out = {"out": str(a.out), "sha256": ens.sha256, "fit_rows": int(ens.fit_indices.numel()),
           "policy_rows": held.n, "weights": ens.weights.tolist(), "held_out": rows}
    if a.json:
        _print_json(out)
        return 0
    print(f"{a.out}: ensemble {ens.sha256[:12]} fitted on {out['fit_rows']} cal rows (seed {a.seed}); policies fit "
          f"on the other {held.n}")
    print("weights w[k, j] (exit k's share of exit j's log-probabilities):")
    for k, row in enumerate(ens.weights.tolist()):
        print(f"  exit {k}: " + " ".join(f"{v:.3f}" for v in row[:k + 1]))
    print(f"on the {held.n} held-out cal rows  " + "  ".join(f"exit {k}" for k in range(ens.k)))
    for r in rows:
        print(f"  accuracy {r['records']:>9}: " + "  ".join(f"{v:.4f}" for v in r["accuracy"]))
        print(f"  ECE      {r['records']:>9}: " + "  ".join(f"{v:.4f}" for v in r["ece"]))
    return 0


# ----------------------------------------------------------------------------- evaluate, sweep

def _add_evaluate(sub) -> None:
    p = _subcommand(sub, _run_evaluate, _CAL, _ENSEMBLE, _JSON, _OVERWRITE)
    p.add_argument("record", help="exit record to evaluate on (eelab record ... --split test)")
    p.add_argument("--policy", required=True, help=f"policy name ({_policy_names()}) or a saved policy file")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, repeatable, e.g. --param threshold=0.9 --param score=entropy")
    p.add_argument("--save-policy", metavar="FILE", help="write the fitted policy to FILE")


def _add_sweep(sub) -> None:
    p = _subcommand(sub, _run_sweep, _CAL, _ENSEMBLE, _JSON)
    p.add_argument("record", help="exit record to score on (eelab record ... --split test)")
    p.add_argument("--policy", required=True, help=f"policy name: {_policy_names()}")


def _policy_params(pairs: list[str]) -> dict[str, str]:
    """--param KEY=VALUE strings as a dict; the policy parses and checks the values."""
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EelabError(f"--param expects KEY=VALUE (e.g. threshold=0.9), got {pair!r}")
        if key.strip() in params:
            raise EelabError(f"--param {key.strip()} is given twice; give each parameter once")
        params[key.strip()] = value.strip()
    return params


def _load_cal(record_path: str, cal_path: str | None, record, ensemble=None):
    """The cal record (--cal, or cal.pt beside RECORD), checked to come from the same model as RECORD; with an
    ensemble, its ensembled part that the ensemble was not fitted on."""
    from .records import check_same_model, load_record

    path = Path(cal_path) if cal_path else Path(record_path).parent / "cal.pt"
    if not path.is_file():
        raise EelabError(f"cal record {path} does not exist; record it with `eelab record CHECKPOINT --split cal "
                         f"--out {path}` or pass --cal FILE")
    cal = load_record(path)
    if ensemble is not None:
        cal = ensemble.apply(cal, f"cal record {path}")
    check_same_model(record, cal, f"record {record_path}", f"cal record {path}")
    return cal, path


def _load_record(path: str, ensemble_path: str | None):
    """(RECORD, the ensemble or None): with --ensemble, the record ensembled by it."""
    from .ensemble import load_ensemble
    from .records import load_record

    record = load_record(path)
    if ensemble_path is None:
        return record, None
    ensemble = load_ensemble(ensemble_path)
    return ensemble.apply(record, f"record {path}"), ensemble


def _run_evaluate(a: argparse.Namespace) -> int:
    """decide exits on a record with a policy and report accuracy and cost

    Fit the policy on the cal record (where it learns anything), decide on RECORD, and report accuracy, compute
    saved, exit fractions and more.
    """
    from .files import check_output
    from .metrics import evaluate
    from .policies import POLICIES, make_policy

    if a.save_policy:  # before the fit, so a bad path never costs the result
        check_output(a.save_policy, "policy file", a.overwrite, option="--save-policy")
    record, ensemble = _load_record(a.record, a.ensemble)
    policy = make_policy(a.policy, **_policy_params(a.param))
    cal_path = None
    if a.policy in POLICIES:
        if policy.needs_fit() or a.cal:
            cal, cal_path = _load_cal(a.record, a.cal, record, ensemble)
            policy.fit(cal)
    elif a.cal:
        raise EelabError(f"policy file {a.policy} is already fitted; drop --cal, or give a policy name to refit")
    exits = policy.decide(record)  # refuses a policy fitted on another checkpoint's outputs, or ensembled otherwise
    out = {"record": str(a.record), "cal": None if cal_path is None else str(cal_path),
           "ensemble": record.meta.get("ensemble_sha256"), "policy": policy.name,
           "params": policy.params, "label": policy.describe(), **{f"fitted_{k}": v for k, v in policy.summary().items()},
           **evaluate(record, exits, overhead=policy.overhead_macs(record.k, record.c))}
    if hasattr(policy, "guarantee") and policy.fitted:
        out["guarantee"] = policy.guarantee()
    if a.save_policy:
        policy.save(a.save_policy, overwrite=a.overwrite)
    if a.json:
        _print_json(out)
        return 0
    mega = 1e6
    print(f"{out['label']} on {a.record} ({record.n} samples, {record.k} exits)")
    if "guarantee" in out:
        print(f"guarantee: {out['guarantee']}")
    print(f"accuracy {out['accuracy']:.4f}   compute saved {out['compute_saved']:+.4f}   mean MACs "
          f"{out['mean_macs'] / mega:.2f}M of {out['full_macs'] / mega:.2f}M   effectiveness {out['effectiveness']:.2f} "
          f"(block-index {out['effectiveness_block_index']:.2f})")
    print(f"{'exit':>4} {'MACs':>10} {'left here':>10} {'exit acc':>9} {'acc of left':>12}")
    for k in range(record.k):
        left = out["accuracy_of_exited"][k]
        print(f"{k:>4} {out['exit_macs'][k] / mega:>9.2f}M {out['exit_fractions'][k]:>10.4f} "
              f"{out['exit_accuracy'][k]:>9.4f} {'-' if left is None else f'{left:.4f}':>12}")
    if a.save_policy:
        print(f"policy written to {a.save_policy}")
    return 0


def _run_sweep(a: argparse.Namespace) -> int:
    """a policy's accuracy-vs-compute frontier over its default grid

    Fit the policy on the cal record at every point of its default grid, score each on RECORD, and report the
    Pareto front and the area under it.
    """
    from .metrics import area_under_frontier, frontier_range, oracle_frontier, pareto_front
    from .policies import POLICIES
    from .sweep import sweep

    if a.policy not in POLICIES:
        raise EelabError(f"sweep needs a policy name, one of {', '.join(POLICIES)}; got {a.policy!r}")
    record, ensemble = _load_record(a.record, a.ensemble)
    cal, cal_path = _load_cal(a.record, a.cal, record, ensemble)
    table = sweep(a.policy, cal, record)
    front = pareto_front(table)
    lo, hi = frontier_range(record)
    area = area_under_frontier(table, lo, hi)
    oracle_area = area_under_frontier(oracle_frontier(record), lo, hi)
    if a.json:
        _print_json(_json_safe({"record": str(a.record), "cal": str(cal_path), "policy": a.policy,
                                "ensemble": record.meta.get("ensemble_sha256"),
                                "range": [lo, hi], "area_under_frontier": area,
                                "oracle_area_under_frontier": oracle_area, "pareto": front.index.tolist(),
                                "points": table.to_dict("records")}))
        return 0
    shown = front.iloc[sorted({round(i * (len(front) - 1) / 14) for i in range(15)})] if len(front) > 15 else front
    print(f"{a.policy} sweep on {a.record} ({record.n} samples), fitted on {cal_path}: {len(table)} points, "
          f"{len(front)} on the Pareto front" + (f" ({len(shown)} shown; --json for all)" if len(shown) < len(front) else ""))
    print(shown.drop(columns=["mean_macs", "effectiveness_block_index"]).to_string(
        index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"area under frontier over rel. MACs [{lo:.3f}, {hi:.3f}]: {area:.4f} (oracle {oracle_area:.4f})")
    return 0


def _json_safe(obj: Any) -> Any:
    """NaN and infinities as None, tensors and numpy numbers as plain Python, for strict JSON."""
    import math

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- predict, bench, profile

def _add_policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help=f"policy name ({_policy_names()}) or saved policy file (default: threshold, "
                                    "max-prob >= 0.9); a name that must be fitted is fitted on cal.pt in the "
                                    "checkpoint directory")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="policy parameter, repeatable")
    p.add_argument("--ensemble", metavar="FILE", help="exit ensemble file (eelab ensemble): each exit answers with the "
                                                      "combination of exits 0..k")
    _add_precision_option(p)


def _add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="run the network in fp32 (default), bf16 (weights cast once, channels_last), or auto: bf16 "
                        "on a CPU with native bf16 (AMX, AVX512-BF16), else fp32")


def _noted(a: argparse.Namespace, fn: Callable[[], Any]) -> Any:
    """fn(), with a precision note it raises (inference.PrecisionNote) shown as one line on stderr."""
    import warnings

    from .inference import PrecisionNote

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionNote)
        out = fn()
    for w in caught:
        if issubclass(w.category, PrecisionNote):
            sys.stderr.write(f"eelab {a.command}: note: {w.message}\n")
        else:  # any other warning as Python would have shown it
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return out


def _add_predict(sub) -> None:
    p = _subcommand(sub, _run_predict, _THREADS, _JSON)
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("images", nargs="+", help="image files")
    _add_policy_options(p)
    p.add_argument("--batch", type=int, default=256, help="images per stage run when streaming (default 256)")


def _run_predict(a: argparse.Namespace) -> int:
    """classify image files with true early exit

    Each image runs stage by stage and stops at the exit its policy picks; no later stage is computed. Images of
    any size or mode are converted as the model's config says. Many files are streamed: decoded as they are
    needed, every stage run on full batches of --batch, answers printed in the order given.
    """
    if a.batch < 1:
        raise EelabError("--batch must be at least 1")
    from .inference import EarlyExitPredictor

    pred = _noted(a, lambda: EarlyExitPredictor.from_checkpoint(a.checkpoint, a.policy, _policy_params(a.param),
                                                                precision=a.precision, ensemble=a.ensemble))
    results = pred.stream_files(a.images, batch=a.batch)
    if a.json:
        _print_json({"checkpoint": a.checkpoint, "policy": pred.policy.describe(), "precision": pred.precision,
                     "ensemble": None if pred.ensemble is None else pred.ensemble.sha256,
                     "predictions": [r.to_dict() for r in results]})
        return 0
    for r in results:
        print(f"{r.source}: {r.class_name} ({r.confidence:.3f}) at exit {r.exit}, {r.macs / 1e6:.1f}M MACs")
    return 0


def _add_bench(sub) -> None:
    p = _subcommand(sub, _run_bench, _THREADS, _JSON)
    p.add_argument("checkpoint", help="checkpoint directory")
    _add_policy_options(p)
    p.add_argument("--images", type=int, default=200, help="test images timed at batch 1 (default 200)")
    p.add_argument("--batch", type=int, default=256, help="batch size for throughput (default 256)")
    p.add_argument("--batch-images", type=int, default=2048, help="test images timed at --batch (default 2048)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds, median reported (>= 1)")
    p.add_argument("--stream", action="store_true", help="also time streamed early exit at --batch "
                                                         "(every stage at full batch)")


def _run_bench(a: argparse.Namespace) -> int:
    """wall clock of early exit against the plain network

    Latency per image at batch 1 and throughput at a large batch on the test split, plain network (last exit
    only) and early exit in alternating rounds (median), with the saving MACs predict beside the measured one;
    --stream adds streamed early exit at the large batch.
    """
    from .inference import benchmark_inference

    if a.rounds < 1 or a.images < 1 or a.batch < 1 or a.batch_images < 1:
        raise EelabError("--rounds, --images, --batch and --batch-images must be at least 1")
    r = _noted(a, lambda: benchmark_inference(a.checkpoint, a.policy, _policy_params(a.param), n_latency=a.images,
                                              n_throughput=a.batch_images, batch=a.batch, rounds=a.rounds,
                                              precision=a.precision, stream=a.stream, ensemble=a.ensemble))
    if a.json:
        _print_json(_json_safe(r))
        return 0
    b1 = r["batch1"]
    ensembled = f", exits ensembled by {r['ensemble'][:12]}" if r.get("ensemble") else ""
    print(f"{r['policy']} on {r['checkpoint']} ({r['threads']} threads, {r['precision']}{ensembled}, median of "
          f"{r['rounds']} alternating rounds)")
    print(f"batch 1:   plain {b1['plain_ms_per_image']:.2f} ms/image, early exit {b1['early_ms_per_image']:.2f} "
          f"ms/image: time saved {b1['time_saving']:+.3f}, MACs predict {b1['mac_saving']:+.3f}")
    for key in (f"batch{a.batch}", f"stream{a.batch}"):
        if key in r:
            v = r[key]
            print(f"{key}: plain {v['plain_images_per_s']:.0f} images/s, early exit {v['early_images_per_s']:.0f} "
                  f"images/s: time saved {v['time_saving']:+.3f}, MACs predict {v['mac_saving']:+.3f}")
    return 0


def _add_profile(sub) -> None:
    p = _subcommand(sub, _run_profile, _THREADS, _JSON)
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    _add_precision_option(p)


def _run_profile(a: argparse.Namespace) -> int:
    """time, MACs and activation size of every stage and head

    Per stage and per head: median time, MACs, and the size of the activation leaving the stage (what an
    edge/cloud split there would send).
    """
    from .inference import profile_checkpoint

    if a.batch < 1 or a.rounds < 1:
        raise EelabError("--batch and --rounds must be at least 1")
    r = profile_checkpoint(a.checkpoint, batch=a.batch, rounds=a.rounds, precision=a.precision)
    if a.json:
        _print_json(r)
        return 0
    print(f"{r['checkpoint']}: batch {r['batch']}, {r['threads']} threads, {r['precision']}, input {r['input_shape']} "
          f"({r['input_bytes']} bytes)")
    print(f"{'exit':>4} {'stage ms':>9} {'head ms':>8} {'to exit ms':>10} {'stage MACs':>11} {'head MACs':>10} "
          f"{'activation':>16} {'bytes':>9}")
    for s in r["stages"]:
        print(f"{s['exit']:>4} {s['stage_ms']:>9.3f} {s['head_ms']:>8.3f} {s['cumulative_ms']:>10.3f} "
              f"{s['stage_macs'] / 1e6:>10.2f}M {s['head_macs'] / 1e6:>9.3f}M {str(s['activation_shape']):>16} "
              f"{s['activation_bytes']:>9}")
    print(f"plain network: {r['plain_ms']:.3f} ms")
    return 0


# ----------------------------------------------------------------------------- export

def _add_export(sub) -> None:
    p = _subcommand(sub, _run_export, _THREADS, _JSON)
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--format", required=True, choices=["onnx"], help="graph format (onnx)")
    p.add_argument("--out", required=True, help="directory to write (new, empty, or a previous export of this "
                                                "checkpoint)")
    p.add_argument("--policy", help="policy name or saved policy file to ship with the graphs (copied beside as "
                                    "policy.pt); a name that must be fitted is fitted on cal.pt in the checkpoint")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="policy parameter, repeatable")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out that holds something else")


def _run_export(a: argparse.Namespace) -> int:
    """export stages and heads as ONNX graphs, early exit kept

    One graph per stage, per head and per confidence branch (dynamic batch size), plus export.json with the
    normalisation, input shape, class names, costs and the checkpoint's sha256, and the policy given with --policy
    (its file copied beside). eelab.export.OnnxEarlyExit runs them with onnxruntime through eelab's one step loop.
    """
    from .export import export_onnx

    if a.param and not a.policy:
        raise EelabError("--param needs --policy NAME")
    meta = export_onnx(a.checkpoint, a.out, a.policy, _policy_params(a.param), overwrite=a.overwrite)
    if a.json:
        _print_json({"out": str(a.out), **meta})
    else:
        policy = f", policy {meta['policy']['label']}" if meta["policy"] else ""
        print(f"{len(meta['files'])} ONNX graphs ({meta['num_exits']} exits{policy}) written to {a.out}")
    return 0


# ----------------------------------------------------------------------------- datasets

def _add_datasets(sub) -> None:
    p = _subcommand(sub, _run_datasets, _JSON)
    p.add_argument("--no-verify", action="store_true",
                   help="skip the publishers' MD5 checks (re-packaged copies; EELAB_NO_VERIFY=1 does the same)")


def _run_datasets(a: argparse.Namespace) -> int:
    """where each dataset was found, in which form and size, or what is missing

    For every dataset --dataset names: the folder it was found in ($EELAB_DATASETS, data/, ../shared/datasets/),
    whether as its publisher ships it or in torchvision's layout, its size, and whether it matches the publisher's
    MD5; or, when it is nowhere, the file names accepted. Nothing is unpacked or downloaded. Exits 1 when a file
    fails its checksum.
    """
    from .data import describe_datasets

    rows = describe_datasets(verify=False if a.no_verify else None)
    if a.json:
        _print_json(rows)
    else:
        for r in rows:
            if not r["found"]:
                print(f"{r['name']:<14} missing: accepts {r['accepts']}")
                continue
            unpacked = f", unpacked in {r['unpacked_into']}" if r["unpacked_into"] else ""
            print(f"{r['name']:<14} {r['form']:<12} {r['bytes'] / 1e6:>9.1f} MB  {r['folder']}{unpacked} "
                  f"(checksum: {r['checksum']})")
            for problem in r["problems"]:
                print(f"{'':<14} {problem}")
        looked = next((r["looked_in"] for r in rows if not r["found"]), None)
        if looked:
            print(f"searched {', '.join(looked)}; set $EELAB_DATASETS to look in another folder first")
    return 1 if any(r.get("problems") for r in rows) else 0


# ----------------------------------------------------------------------------- figures

def _add_figures(sub) -> None:
    from .figures import FIGURE_SIZES  # light: errors and files only

    p = _subcommand(sub, _run_figures, _JSON)
    p.add_argument("notebook", help="01, 02, 03, 04, a notebook's name (04_compare_policies) or a path to a .ipynb")
    p.add_argument("--out", required=True, help="folder for the figures, tables and NN_manifest.json")
    p.add_argument("--checkpoint", help="checkpoint directory the notebook reads (default: the notebook's own)")
    p.add_argument("--smoke", action="store_true", help="the notebook's quick run (subsets, thin grids), as the "
                                                        "tests run it")
    p.add_argument("--size", choices=FIGURE_SIZES, default="default",
                   help="every figure one column (3.3 in) or two columns (6.9 in) wide; default: as the notebook "
                        "draws each")


def _run_figures(a: argparse.Namespace) -> int:
    """a notebook's figures and tables, no browser

    Runs the notebook top to bottom headless (its kernel in a subprocess), from the fits its earlier runs cached
    in runs/fitted/, with its export on: the same figures (PDF, SVG, PNG), tables (CSV, LaTeX) and manifest the
    export button writes, into --out. For papers rebuilt from a Makefile.
    """
    from .figures import make_figures

    out = Path(a.out)  # checked (a file, unwritable) by make_figures before the notebook runs
    written = make_figures(a.notebook, out, smoke=a.smoke, checkpoint=a.checkpoint, size=a.size)
    if a.json:
        _print_json({"out": str(out), "files": [str(p) for p in written]})
    else:
        print(f"{len(written)} files written to {out}:")
        for path in written:
            print(f"  {path.name}")
    return 0


# ----------------------------------------------------------------------------- entry point

# Literal list of subcommands, in the order `eelab --help` shows them.
_SUBCOMMANDS: list[Callable] = [_add_train, _add_record, _add_ensemble, _add_evaluate, _add_sweep, _add_predict,
                                 _add_bench,
                                 _add_profile, _add_datasets, _add_export, _add_figures]


def build_parser() -> argparse.ArgumentParser:
    """The `eelab` argument parser with every subcommand."""
    from .__version__ import __version__

    parser = _Parser(prog="eelab", description="A workbench for early-exit neural networks: run the network "
                                                "once, decide many times.")
    parser.add_argument("--version", action="version", version=f"eelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _one_line_warnings(command: str) -> Callable:
    """Show eelab's own warnings (EelabWarning) as one line on stderr, as errors are; others as Python would.
    Returns the previous warnings.showwarning, which main restores."""
    import warnings

    from .errors import EelabWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning's signature
        if isinstance(category, type) and issubclass(category, EelabWarning):
            sys.stderr.write(f"eelab {command}: warning: {' '.join(str(message).split())}\n")
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    return default


def main(argv: list[str] | None = None) -> int:
    """Run the `eelab` command; returns the exit status."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if a.command is None:
        parser.print_help()
        return 2
    previous = _one_line_warnings(a.command)
    try:
        if getattr(a, "threads", None) is not None and a.threads < 1:
            raise EelabError(f"--threads must be at least 1, got {a.threads}")
        if getattr(a, "threads", None):
            import torch
            torch.set_num_threads(a.threads)
        return a.run(a)
    except EelabError as e:
        sys.stderr.write(f"eelab {a.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"eelab {a.command}: interrupted; a training run continues with --resume\n")
        return 130
    except Exception as e:  # never a traceback for users; EELAB_DEBUG=1 shows it
        if os.environ.get("EELAB_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        sys.stderr.write(f"eelab {a.command}: internal error: {type(e).__name__}: {msg} "
                         "(rerun with EELAB_DEBUG=1 for a traceback, and please report it)\n")
        return 3
    finally:
        import warnings

        warnings.showwarning = previous


if __name__ == "__main__":
    raise SystemExit(main())
