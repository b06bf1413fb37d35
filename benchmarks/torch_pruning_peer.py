"""The external peer: Torch-Pruning's own pruner, under compress's data pipeline and schedule.

    python benchmarks/torch_pruning_peer.py --out runs/vgg16-tp-f76 --model vgg16 --target flops=0.76 \
        --preset cpu --data-dir /work/shared/data [--importance magnitude|taylor] [--resume] [--force]

Same protocol as compress's one-shot methods (l1, taylor): train dense for (1 - --finetune-fraction)
of the epochs with compress's Trainer, then prune once with `torch_pruning.pruner.BasePruner`
(global ranking, `global_pruning=True`, `max_pruning_ratio` = 1 - --min-keep, the classifier
ignored) and fine-tune the physically smaller network for the rest of the budget with a new
learning-rate cycle. Torch-Pruning prunes by a *channel* ratio, not a FLOPs target, so the global
ratio is bisected (each trial prunes a fresh copy of the trained dense network and is counted with
compress.flops.count) until the FLOPs (or params) reduction is within 0.5 pp of the target.

Every compress option is accepted (`python -m compress --help`) except the two selection rules
Torch-Pruning has no counterpart for, --cost-power and --round-to, which are refused; the run folder is the same as
compress writes (docs/formats.md §1: report.json with method "torch-pruning", model.pt2,
weights.safetensors + arch.json, train_log.csv, calib.npz, test.npz, channels.png), built in
OUT.partial with a checkpoint after every epoch, so `--resume` continues a killed run and the
folder can be exported with `python -m export` like any other.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compress import cli as compress_cli  # noqa: E402
from compress import report  # noqa: E402
from compress.api import check_reachable  # noqa: E402
from compress.data import load_dataset  # noqa: E402
from compress.errors import UserError  # noqa: E402
from compress.flops import count  # noqa: E402
from compress.methods import _load_init, split_epochs  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.prune.cost import ResourceModel  # noqa: E402
from compress.prune.graph import find_groups  # noqa: E402
from compress.prune.surgery import arch_of, rebuild  # noqa: E402
from compress.train import Callback, Phase, TrainConfig, Trainer, init_distributed  # noqa: E402

METHOD = "torch-pruning"
IMPORTANCES = ("magnitude", "taylor")
TOLERANCE = 0.005     # bisect until the achieved reduction is this close to the target
MAX_TRIALS = 30


# ---------------------------------------------------------------------------------------------
# pruning to a FLOPs/params target with Torch-Pruning


def make_importance(kind: str):
    import torch_pruning as tp
    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise UserError(f"--importance {kind!r}: choose one of {', '.join(IMPORTANCES)}")


def classifier_names(model: nn.Module) -> list[str]:
    """The last Linear (or, in an all-conv network, the last conv): its outputs are the classes."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return (linears or convs)[-1:]


@dataclass
class PruneResult:
    model: nn.Module
    ratio: float                 # the global channel pruning ratio that met the target
    reduction: float             # the achieved reduction of the target metric
    trials: list = field(default_factory=list)   # (ratio, reduction) of every bisection step


def prune_once(dense: nn.Module, ratio: float, *, importance: str, example: torch.Tensor, ignore: list[str],
               max_ratio: float, grads: Optional[dict]) -> nn.Module:
    """A pruned copy of `dense` at global channel ratio `ratio` (dense itself is untouched)."""
    import torch_pruning as tp
    model = copy.deepcopy(dense)
    if grads is not None:   # Taylor importance reads weight.grad
        for name, p in model.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    pruner = tp.pruner.BasePruner(
        model, example, importance=make_importance(importance), global_pruning=True,
        pruning_ratio=ratio, max_pruning_ratio=max_ratio,
        ignored_layers=[model.get_submodule(n) for n in ignore])
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def prune_to_target(dense: nn.Module, *, metric: str, reduction: float, importance: str, min_keep: float,
                    ignore: list[str], input_shape: tuple, grads: Optional[dict] = None) -> PruneResult:
    """Bisect Torch-Pruning's global channel ratio until `metric` drops by `reduction` (+-0.5 pp)."""
    example = torch.zeros(1, *input_shape[1:])
    base = getattr(count(dense, input_shape), metric)
    max_ratio = 1.0 - min_keep

    def trial(ratio: float) -> tuple[nn.Module, float]:
        model = prune_once(dense, ratio, importance=importance, example=example, ignore=ignore,
                           max_ratio=max_ratio, grads=grads)
        return model, 1.0 - getattr(count(model, input_shape), metric) / base

    lo, hi = 0.0, max_ratio
    best: Optional[PruneResult] = None
    trials = []
    for _ in range(MAX_TRIALS):
        ratio = (lo + hi) / 2
        model, got = trial(ratio)
        trials.append((round(ratio, 6), round(got, 6)))
        if best is None or abs(got - reduction) < abs(best.reduction - reduction):
            best = PruneResult(model, ratio, got)
        if abs(got - reduction) <= TOLERANCE:
            break
        lo, hi = (ratio, hi) if got < reduction else (lo, ratio)
    if abs(best.reduction - reduction) > 0.01:
        _, most = trial(max_ratio)
        raise UserError(f"Torch-Pruning cannot reach {metric}={reduction:g}: the closest global ratio "
                        f"{best.ratio:.4f} gives {best.reduction:.4f} (at the --min-keep limit: {most:.4f})")
    best.trials = trials
    return best


def accumulate_grads(trainer: Trainer, batches: int) -> dict[str, torch.Tensor]:
    """Sum of the loss gradients over `batches` training batches (no weight update), on CPU."""
    from compress.data import batches as make_batches
    c, d = trainer.config, trainer.data
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    it = make_batches(d.x_train, d.y_train, c.batch_size, train=True, seed=c.seed + 1, epoch=trainer.epoch,
                      mean=d.mean, std=d.std, device=trainer.device, channels_last=c.channels_last)
    for i, (x, y) in enumerate(it):
        if i >= batches:
            break
        with trainer.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    grads = {n: p.grad.detach().to("cpu", memory_format=torch.contiguous_format).float().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


class TorchPruningStep(Callback):
    """At the end of the dense phase: evaluate, prune with Torch-Pruning to the target, hand the
    trainer the smaller network (the trainer rebuilds its optimizer; checkpoints record the shape)."""

    def __init__(self, at_epoch: int, metric: str, reduction: float, importance: str, min_keep: float,
                 ignore: list[str], input_shape: tuple, taylor_batches: int):
        self.at_epoch, self.metric, self.reduction = at_epoch, metric, reduction
        self.importance, self.min_keep, self.ignore = importance, min_keep, ignore
        self.input_shape, self.taylor_batches = input_shape, taylor_batches
        self.pruned = False
        self.dense_top1: Optional[float] = None
        self.info: dict = {}

    def on_epoch_end(self, trainer, epoch):
        if self.pruned or epoch != self.at_epoch:
            return
        self.dense_top1 = trainer.evaluate().top1
        grads = accumulate_grads(trainer, self.taylor_batches) if self.importance == "taylor" else None
        dense = copy.deepcopy(trainer.model).to("cpu", memory_format=torch.contiguous_format).eval()
        started = time.perf_counter()
        result = prune_to_target(dense, metric=self.metric, reduction=self.reduction, importance=self.importance,
                                 min_keep=self.min_keep, ignore=self.ignore, input_shape=self.input_shape,
                                 grads=grads)
        self.info = {"pruning_ratio": result.ratio, "reduction": result.reduction, "trials": result.trials,
                     "search_seconds": round(time.perf_counter() - started, 2)}
        print(f"torch-pruning: global ratio {result.ratio:.4f} -> {self.metric} reduction "
              f"{result.reduction:.4f} ({len(result.trials)} trials)", file=sys.stderr)
        trainer.model = result.model.train()
        self.pruned = True

    def state_dict(self):
        # Plain numbers and lists only: the checkpoint is loaded with weights_only=True.
        return {"pruned": self.pruned, "dense_top1": -1.0 if self.dense_top1 is None else self.dense_top1,
                "info": {k: ([list(t) for t in v] if k == "trials" else float(v)) for k, v in self.info.items()}}

    def load_state_dict(self, state):
        self.pruned = bool(state["pruned"])
        self.dense_top1 = None if state["dense_top1"] < 0 else float(state["dense_top1"])
        self.info = dict(state["info"])


# ---------------------------------------------------------------------------------------------
# the command line: compress's options plus --importance


def make_parser():
    p = compress_cli.make_parser()
    p.prog = "python benchmarks/torch_pruning_peer.py"
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--importance", choices=None,
                   help=f"Torch-Pruning importance: {', '.join(IMPORTANCES)} (default magnitude: group L2 norm)")
    return p


def resolve(args) -> tuple[compress_cli.RunConfig, str]:
    importance = args.importance or "magnitude"
    if importance not in IMPORTANCES:
        raise UserError(f"--importance {importance!r}: choose one of {', '.join(IMPORTANCES)}")
    if args.method not in (None, METHOD):
        raise UserError(f"--method is {METHOD} here; got {args.method!r}")
    if args.widths_from:
        raise UserError("--widths-from is for compress's random/scratch methods, not for Torch-Pruning")
    if args.target is None:
        raise UserError("--target flops=R or params=R is required: the reduction Torch-Pruning must reach")
    args.method = "l1"       # validated exactly as compress's one-shot methods are
    cfg = compress_cli.resolve(args)
    # compress's selection options that Torch-Pruning has no counterpart for: refused, not ignored.
    if cfg.cost_power != 0:
        raise UserError("--cost-power is compress's selection rule; Torch-Pruning ranks by its importance alone")
    if cfg.round_to != 1:
        # BasePruner's own round_to rounds each layer down after its global ranking and skips a layer
        # it would empty: the FLOPs cut is then not monotonic in the ratio (1/4-width VGG-16, round_to=8:
        # ratio 0.8 -> -75 %, 0.9 -> -53 %), so no target can be bisected to.
        raise UserError("--round-to is not supported for Torch-Pruning: its rounding makes the FLOPs cut "
                        "non-monotonic in the pruning ratio, so the target cannot be searched for")
    return replace(cfg, method=METHOD), importance


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    created = None
    try:
        args = make_parser().parse_args(argv)
        if not args.out:
            raise UserError("--out is required: the run folder to write")
        out = Path(args.out)
        work = compress_cli.partial_dir(out)
        if args.resume:
            compress_cli.prepare_folders(out, resume=True, force=args.force)
            stored = compress_cli.stored_config(work)
            importance = stored.pop("importance", "magnitude")
            if args.importance not in (None, importance):
                raise UserError(f"--resume continues the stored run: --importance {args.importance!r} differs "
                                f"from its {importance!r}")
            args.method = None
            cfg = compress_cli.config_for_resume(args, {**stored, "method": "l1"})
            compress_cli.validate(cfg)
            cfg = replace(cfg, method=METHOD)
        else:
            cfg, importance = resolve(args)
            compress_cli.prepare_folders(out, resume=False, force=args.force)
            created = work
        if not cfg.name:
            cfg.name = out.name
        run(cfg, importance, work=work, out=out, resume=args.resume)
    except UserError as exc:
        compress_cli._drop_if_empty(created)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        compress_cli._drop_if_empty(created)
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    except BaseException:
        compress_cli._drop_if_empty(created)
        raise
    return 0


def run(cfg, importance: str, *, work: Path, out: Path, resume: bool) -> None:
    """Train dense, prune with Torch-Pruning, fine-tune; write and publish the run folder."""
    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(cfg.device))
    dist_info = init_distributed(cfg.device)
    if dist_info.enabled:
        raise UserError("the Torch-Pruning peer runs on one process (no torchrun)")
    started = time.time()
    if cfg.target_spec.get("also"):
        raise UserError("the Torch-Pruning peer prunes to one metric: give flops=R or params=R, not both")
    full = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size)
    num_classes = cfg.num_classes or len(full.classes)
    hw = tuple(full.x_train.shape[1:3])
    input_shape = (1, 3, *hw)
    if not resume:   # the same precision (and --time-budget sizing) rule as compress
        compress_cli.choose_precision_and_size(cfg, full, num_classes, input_shape, cfg.device)
    data = compress_cli.draw_subsets(full, cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes, cfg.width)
    if cfg.init:
        _load_init(model, cfg.init)
    dense_counts = count(model, input_shape)
    dense_epochs, finetune_epochs = split_epochs(cfg.epochs, cfg.finetune_fraction, METHOD)
    if not resume:   # an unreachable target should fail now, not after the dense half of the budget
        example = torch.zeros(2, *input_shape[1:])
        groups = find_groups(model, example, cfg.ignore)
        check_reachable(ResourceModel(model, groups, example), cfg.target_metric, cfg.target_reduction,
                        cfg.min_keep)
    ignore = sorted(set(classifier_names(model)) | set(cfg.ignore))
    step = TorchPruningStep(dense_epochs - 1, cfg.target_metric, cfg.target_reduction, importance, cfg.min_keep,
                            ignore, input_shape, cfg.taylor_batches)
    train_config = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing, bf16=cfg.bf16, channels_last=cfg.channels_last, seed=cfg.seed,
        device=cfg.device, eval_every=cfg.eval_every, progress=cfg.progress)
    spec = dict(spec=cfg.model, num_classes=num_classes, width=cfg.width)
    config = {**compress_cli.config_as_dict(cfg), "importance": importance}
    trainer = Trainer(model, data, train_config, [Phase("dense", dense_epochs), Phase("finetune", finetune_epochs)],
                      [step], workdir=work, input_shape=input_shape, arch_of=lambda m: arch_of(m, **spec),
                      rebuild=rebuild, extra_state={"config": config},
                      keep=(dense_epochs - 1, compress_cli.DENSE_CHECKPOINT) if cfg.keep_dense else None)
    if resume:
        trainer.load_checkpoint(work / "checkpoint.pt")
    elif cfg.dense_from:
        compress_cli.start_from_dense(trainer, cfg)
    trainer.fit()

    slim = trainer.model.to(trainer.device, memory_format=torch.contiguous_format).eval()
    slim_top1 = trainer.evaluate(slim, bf16=False).top1
    slim.to("cpu")
    summary = report.write_run_folder(
        work, slim, name=cfg.name, method=METHOD, data=data, num_classes=num_classes,
        target={"metric": cfg.target_metric, "reduction": cfg.target_reduction}, dense_counts=dense_counts,
        dense_top1=step.dense_top1, slim_top1=slim_top1, arch=arch_of(slim, **spec), epochs=cfg.epochs,
        seconds=trainer.seconds, wall_seconds=time.time() - started, config=config, calib=cfg.calib, seed=cfg.seed)
    # What Torch-Pruning did, next to compress's schema (docs/formats.md §1 allows extra keys).
    summary["torch_pruning"] = {"version": metadata.version("torch-pruning"), "pruner": "BasePruner",
                                "global_pruning": True, "importance": importance, "ignored_layers": ignore,
                                **step.info}
    report.write_report(work / "report.json", summary)
    compress_cli.publish(work, out)
    achieved = summary["achieved"]
    print(f"wrote {out}: top1 {slim_top1:.4f}, flops {summary['slim']['flops'] / 1e6:.2f}M "
          f"(-{achieved['flops_reduction']:.1%}), params {summary['slim']['params'] / 1e6:.3f}M "
          f"(-{achieved['params_reduction']:.1%})")


if __name__ == "__main__":
    sys.exit(main())
