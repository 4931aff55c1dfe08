"""The `eelab` command: thin over the package. Errors are one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import EelabError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- train

_TRAIN_OPTIONS = {  # CLI option -> TrainConfig field (None: a ModelConfig field)
    "dataset": "dataset", "epochs": "epochs", "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr",
    "weight_decay": "weight_decay", "schedule": "schedule", "label_smoothing": "label_smoothing",
    "loss_weights": "loss_weights", "distill": "distill", "distill_temperature": "distill_temperature",
    "heads_only": "heads_only", "init": "init", "train_samples": "train_samples", "cal_size": "cal_size",
    "augment": "augment", "precision": "precision", "seed": "seed", "image_size": "image_size", "plain": "plain",
    "objective": "objective", "cost_weight": "cost_weight",
}
_MODEL_OPTIONS = {"model": "name", "head": "head", "head_hidden": "head_hidden", "dropout": "dropout",
                  "widths": "widths", "exits_after": "exits_after", "exits_schedule": "exits_schedule",
                  "num_exits": "num_exits"}


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a multi-exit network into a checkpoint directory",
                       description="Train all exits jointly (or heads only on a frozen backbone, or the plain "
                                   "network only); a checkpoint is written after every epoch, --resume continues an "
                                   "interrupted run. CEED's two steps: --plain --out A, then --heads-only --init A "
                                   "--loss-weights 1,..,1,0 --out B. Under torchrun it trains with "
                                   "DistributedDataParallel (--batch-size is the global batch).")
    p.add_argument("--model", help="factory name: ee_cnn (default), ee_resnet18, tiny_cnn, or a torchvision "
                                   "classifier (resnet18..152, vgg11..19[_bn], densenet121..201, mobilenet_v2)")
    p.add_argument("--dataset", help="cifar10-jpeg (default), cifar10, cifar100, svhn, mnist, fashion-mnist, "
                                     "imagenette or folder:PATH")
    p.add_argument("--epochs", type=int, help="default 30")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1 sgd, 2e-3 adamw)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["onecycle", "cosine"])
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--loss-weights", type=_floats, help="per-exit loss weights, e.g. 0.5,0.7,0.9,1")
    p.add_argument("--distill", type=float, help="weight of distilling the last exit into earlier ones")
    p.add_argument("--distill-temperature", type=float)
    p.add_argument("--heads-only", action="store_true", default=None, help="freeze the backbone (needs --init)")
    p.add_argument("--plain", action="store_true", default=None,
                   help="train only the plain network (backbone and last exit); the other heads stay untouched")
    p.add_argument("--init", help="checkpoint directory to start from")
    p.add_argument("--objective", choices=["joint", "eenet"],
                   help="joint: weighted cross-entropy per exit (default); eenet: EENets confidence branches "
                        "trained with cost (records then carry confidences; policy `confidence`)")
    p.add_argument("--cost-weight", type=float, metavar="LAMBDA", help="eenet: weight of the expected cost")
    p.add_argument("--train-samples", type=int, help="train on a seeded subset of N images")
    p.add_argument("--cal-size", type=int, help="images held out of train for calibration (default 5000)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--head", choices=["linear", "mlp", "conv"], help="exit head design (default mlp)")
    p.add_argument("--head-hidden", type=int)
    p.add_argument("--dropout", type=float)

    def ints(text: str) -> tuple[int, ...]:
        values = _floats(text)
        if any(v != int(v) or v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated positive whole numbers, got {text!r}")
        return tuple(int(v) for v in values)

    p.add_argument("--widths", type=ints,
                   help="stage widths of ee_cnn / ee_resnet18 / tiny_cnn, e.g. 64,128,256,512")
    p.add_argument("--exits-after", type=lambda t: tuple(v.strip() for v in t.split(",") if v.strip()),
                   help="torchvision backbones: layers to put an exit after, e.g. layer1,layer2,layer3 (ResNet) or "
                        "features.5,features.10 (VGG, DenseNet, MobileNetV2); the original classifier is the last")
    p.add_argument("--exits-schedule", choices=["even", "pareto", "golden", "fine"],
                   help="torchvision backbones: place exits where cumulative MACs cross this schedule (EENets)")
    p.add_argument("--num-exits", type=int, help="with --exits-schedule: K, the last exit included (default 4)")
    p.add_argument("--image-size", type=int, help="resize images to this square size (imagenette default 64)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--half-weights", action="store_true", help="store model.pt in fp16 (evaluation stays fp32)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=_run_train)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _run_train(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from .training import TrainConfig, read_checkpoint_config, train

    given_train = {f: getattr(a, o) for o, f in _TRAIN_OPTIONS.items() if getattr(a, o) is not None}
    given_model = {f: getattr(a, o) for o, f in _MODEL_OPTIONS.items() if getattr(a, o) is not None}
    if a.exits_after is not None and (a.exits_schedule is not None or a.num_exits is not None):
        raise EelabError("--exits-after names the exits itself; drop --exits-schedule/--num-exits, or drop "
                         "--exits-after to let the schedule place them")
    if a.resume:
        cfg = TrainConfig.from_dict(read_checkpoint_config(a.out)["train"])
        asked = replace(cfg, model=replace(cfg.model, **given_model), **given_train)
        if asked != cfg:
            changed = sorted(k for k in {**given_train, **given_model}
                             if getattr(asked, k, None) != getattr(cfg, k, None)
                             or getattr(asked.model, k, None) != getattr(cfg.model, k, None))
            raise EelabError(f"--resume continues the run in {a.out} as it was configured; drop the changed "
                             f"option(s) {', '.join(changed) or '(model options)'} or train into a new --out")
    else:
        base = TrainConfig()
        cfg = replace(base, model=replace(base.model, **given_model), **given_train)
    out = train(cfg, a.out, resume=a.resume, progress=not a.quiet, half_weights=a.half_weights)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 alone reports
    if a.json:
        from .training import read_history
        conf = read_checkpoint_config(out)
        _print_json({"out": str(out), "history": read_history(out), "costs": conf["costs"],
                     "full_cost": conf["full_cost"]})
    else:
        print(f"checkpoint written to {out}")
    return 0


# ----------------------------------------------------------------------------- record

def _add_record(sub) -> None:
    p = sub.add_parser("record", help="run a checkpoint once over a split and write its exit record",
                       description="One forward pass over the cal or test split; writes every exit's logits "
                                   "and costs (an ExitRecord) atomically.")
    p.add_argument("checkpoint", help="checkpoint directory (eelab train --out)")
    p.add_argument("--split", required=True, choices=["cal", "test"])
    p.add_argument("--out", required=True, help="record file to write (e.g. test.pt)")
    p.add_argument("--limit", type=int, help="only a seeded random subset of N samples of the split (in index order)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_record)


def _run_record(a: argparse.Namespace) -> int:
    from .records import record_checkpoint

    rec = record_checkpoint(a.checkpoint, a.split, limit=a.limit, batch_size=a.batch_size, progress=not a.quiet)
    rec.save(a.out)
    acc = (rec.logits.argmax(-1) == rec.labels[:, None]).double().mean(0).tolist()
    summary = {"out": str(a.out), "split": a.split, "shape": list(rec.logits.shape), "exit_accuracy": acc,
               "costs": rec.costs.tolist(), "full_cost": rec.full_cost}
    if a.json:
        _print_json(summary)
    else:
        print(f"{a.out}: logits {tuple(rec.logits.shape)}; exit accuracy "
              + " ".join(f"{v:.4f}" for v in acc) + "; MACs " + " ".join(f"{c / 1e6:.1f}M" for c in rec.costs))
    return 0


# ----------------------------------------------------------------------------- evaluate, sweep

def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="decide exits on a record with a policy and report accuracy and cost",
                       description="Fit the policy on the cal record (where it learns anything), decide on "
                                   "RECORD, and report accuracy, compute saved, exit fractions and more.")
    p.add_argument("record", help="exit record to evaluate on (eelab record ... --split test)")
    p.add_argument("--policy", required=True, help="policy name (static, threshold, patience, budget, risk, "
                                                    "oracle, alpha, dqn, confidence) or a saved policy file")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter, repeatable, e.g. --param threshold=0.9 --param score=entropy")
    p.add_argument("--cal", help="cal record to fit on (default: cal.pt beside RECORD)")
    p.add_argument("--save-policy", metavar="FILE", help="write the fitted policy to FILE")
    p.add_argument("--json", action="store_true", help="print every metric as JSON on stdout")
    p.set_defaults(run=_run_evaluate)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="a policy's accuracy-vs-compute frontier over its default grid",
                       description="Fit the policy on the cal record at every point of its default grid, score "
                                   "each on RECORD, and report the Pareto front and the area under it.")
    p.add_argument("record", help="exit record to score on (eelab record ... --split test)")
    p.add_argument("--policy", required=True, help="policy name: static, threshold, patience, budget, risk, oracle, "
                                                    "alpha, dqn, confidence")
    p.add_argument("--cal", help="cal record to fit on (default: cal.pt beside RECORD)")
    p.add_argument("--json", action="store_true", help="print every grid point as JSON on stdout")
    p.set_defaults(run=_run_sweep)


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


def _load_cal(record_path: str, cal_path: str | None, record):
    """The cal record (--cal, or cal.pt beside RECORD), checked to come from the same model as RECORD."""
    from .records import check_same_model, load_record

    path = Path(cal_path) if cal_path else Path(record_path).parent / "cal.pt"
    if not path.is_file():
        raise EelabError(f"cal record {path} does not exist; record it with `eelab record CHECKPOINT --split cal "
                         f"--out {path}` or pass --cal FILE")
    cal = load_record(path)
    check_same_model(record, cal, f"record {record_path}", f"cal record {path}")
    return cal, path


def _run_evaluate(a: argparse.Namespace) -> int:
    from .metrics import evaluate
    from .policies import POLICIES, make_policy
    from .records import load_record

    record = load_record(a.record)
    policy = make_policy(a.policy, **_policy_params(a.param))
    cal_path = None
    if a.policy in POLICIES:
        if policy.needs_fit() or a.cal:
            cal, cal_path = _load_cal(a.record, a.cal, record)
            policy.fit(cal)
    elif a.cal:
        raise EelabError(f"policy file {a.policy} is already fitted; drop --cal, or give a policy name to refit")
    else:
        fitted_on, ours = policy.info.get("checkpoint_sha256"), record.meta.get("checkpoint_sha256")
        if fitted_on and ours and fitted_on != ours:
            raise EelabError(f"policy file {a.policy} was fitted on checkpoint {fitted_on[:12]}, the record comes "
                             f"from {ours[:12]}; refit it on this model's cal record")
    exits = policy.decide(record)
    if a.save_policy:
        policy.save(a.save_policy)
    out = {"record": str(a.record), "cal": None if cal_path is None else str(cal_path), "policy": policy.name,
           "params": policy.params, "label": policy.describe(), **{f"fitted_{k}": v for k, v in policy.summary().items()},
           **evaluate(record, exits, overhead=policy.overhead_macs(record.k, record.c))}
    if hasattr(policy, "guarantee") and policy.fitted:
        out["guarantee"] = policy.guarantee()
    if a.json:
        _print_json(_json_safe(out))
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
    from .metrics import area_under_frontier, frontier_range, oracle_frontier, pareto_front, sweep
    from .policies import POLICIES
    from .records import load_record

    if a.policy not in POLICIES:
        raise EelabError(f"sweep needs a policy name, one of {', '.join(POLICIES)}; got {a.policy!r}")
    record = load_record(a.record)
    cal, cal_path = _load_cal(a.record, a.cal, record)
    table = sweep(a.policy, cal, record)
    front = pareto_front(table)
    lo, hi = frontier_range(record)
    area = area_under_frontier(table, lo, hi)
    oracle_area = area_under_frontier(oracle_frontier(record), lo, hi)
    if a.json:
        _print_json(_json_safe({"record": str(a.record), "cal": str(cal_path), "policy": a.policy,
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
    p.add_argument("--policy", help="policy name or saved policy file (default: threshold, max-prob >= 0.9); "
                                    "a name that must be fitted is fitted on cal.pt in the checkpoint directory")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="policy parameter, repeatable")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with true early exit",
                       description="Each image runs stage by stage and stops at the exit its policy picks; no "
                                   "later stage is computed. Images of any size or mode are converted as the "
                                   "model's config says.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("images", nargs="+", help="image files")
    _add_policy_options(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_predict)


def _run_predict(a: argparse.Namespace) -> int:
    from .inference import EarlyExitPredictor

    pred = EarlyExitPredictor.from_checkpoint(a.checkpoint, a.policy, _policy_params(a.param))
    results = pred.predict_files(a.images)
    if a.json:
        _print_json({"checkpoint": a.checkpoint, "policy": pred.policy.describe(),
                     "predictions": [r.to_dict() for r in results]})
        return 0
    for r in results:
        print(f"{r.source}: {r.class_name} ({r.confidence:.3f}) at exit {r.exit}, {r.macs / 1e6:.1f}M MACs")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="wall clock of early exit against the plain network",
                       description="Latency per image at batch 1 and throughput at a large batch on the test "
                                   "split, plain network (last exit only) and early exit in alternating rounds "
                                   "(median), with the saving MACs predict beside the measured one.")
    p.add_argument("checkpoint", help="checkpoint directory")
    _add_policy_options(p)
    p.add_argument("--images", type=int, default=200, help="test images timed at batch 1 (default 200)")
    p.add_argument("--batch", type=int, default=256, help="batch size for throughput (default 256)")
    p.add_argument("--batch-images", type=int, default=2048, help="test images timed at --batch (default 2048)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds, median reported (>= 1)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_bench)


def _run_bench(a: argparse.Namespace) -> int:
    from .inference import benchmark_inference

    if a.rounds < 1 or a.images < 1 or a.batch < 1 or a.batch_images < 1:
        raise EelabError("--rounds, --images, --batch and --batch-images must be at least 1")
    r = benchmark_inference(a.checkpoint, a.policy, _policy_params(a.param), n_latency=a.images,
                            n_throughput=a.batch_images, batch=a.batch, rounds=a.rounds)
    if a.json:
        _print_json(_json_safe(r))
        return 0
    b1, bb = r["batch1"], r[f"batch{a.batch}"]
    print(f"{r['policy']} on {r['checkpoint']} ({r['threads']} threads, median of {r['rounds']} alternating rounds)")
    print(f"batch 1:   plain {b1['plain_ms_per_image']:.2f} ms/image, early exit {b1['early_ms_per_image']:.2f} "
          f"ms/image: time saved {b1['time_saving']:+.3f}, MACs predict {b1['mac_saving']:+.3f}")
    print(f"batch {a.batch}: plain {bb['plain_images_per_s']:.0f} images/s, early exit {bb['early_images_per_s']:.0f} "
          f"images/s: time saved {bb['time_saving']:+.3f}, MACs predict {bb['mac_saving']:+.3f}")
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="time, MACs and activation size of every stage and head",
                       description="Per stage and per head: median time, MACs, and the size of the activation "
                                   "leaving the stage (what an edge/cloud split there would send).")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_profile)


def _run_profile(a: argparse.Namespace) -> int:
    from .inference import profile_checkpoint

    if a.batch < 1 or a.rounds < 1:
        raise EelabError("--batch and --rounds must be at least 1")
    r = profile_checkpoint(a.checkpoint, batch=a.batch, rounds=a.rounds)
    if a.json:
        _print_json(r)
        return 0
    print(f"{r['checkpoint']}: batch {r['batch']}, {r['threads']} threads, input {r['input_shape']} "
          f"({r['input_bytes']} bytes)")
    print(f"{'exit':>4} {'stage ms':>9} {'head ms':>8} {'to exit ms':>10} {'stage MACs':>11} {'head MACs':>10} "
          f"{'activation':>16} {'bytes':>9}")
    for s in r["stages"]:
        print(f"{s['exit']:>4} {s['stage_ms']:>9.3f} {s['head_ms']:>8.3f} {s['cumulative_ms']:>10.3f} "
              f"{s['stage_macs'] / 1e6:>10.2f}M {s['head_macs'] / 1e6:>9.3f}M {str(s['activation_shape']):>16} "
              f"{s['activation_bytes']:>9}")
    print(f"plain network: {r['plain_ms']:.3f} ms")
    return 0


# ----------------------------------------------------------------------------- entry point

# Literal list of subcommands, in the order `eelab --help` shows them.
_SUBCOMMANDS: list[Callable] = [_add_train, _add_record, _add_evaluate, _add_sweep, _add_predict, _add_bench,
                                 _add_profile]


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
    try:
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


if __name__ == "__main__":
    raise SystemExit(main())
