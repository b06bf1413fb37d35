"""Pruning to a latency budget (`--target latency=1.2ms --latency-table FILE`): the one greedy
prices "latency" with a real latency table (conftest.py's `table_path`: tests.latency_fixture's
tiny residual CNN profiled on this machine) and keeps only widths where the runtime gets faster;
budgets out of reach and tables for another network fail before training, in one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.latency import sha256
from compress.prune.budget import positional_scores
from compress.prune.targets import parse_target, target_dict
from device_bench import latency_table as lt
from tests.latency_fixture import MODEL, tiny_resnet

EXAMPLE = torch.zeros(2, 3, 16, 16)


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def cost_with_table(table_path: Path, width: float = 1.0):
    from compress.prune import ResourceModel, find_groups
    model = tiny_resnet(10, width)
    groups = find_groups(model, EXAMPLE)
    cost = ResourceModel(model, groups, EXAMPLE)
    cost.attach_latency(lt.load_table(table_path).entry("tflite", 1))
    return model, groups, cost


def budget_between(cost, share: float) -> float:
    """A budget `share` of the way from the fastest reachable network (min widths) to the dense one."""
    from compress.prune.budget import allowed_widths
    fastest = cost.resource("latency", np.array([w[0] for w in allowed_widths(cost, 0.1)]))
    return fastest + share * (cost.dense("latency") - fastest)


def test_latency_targets_parse():
    assert parse_target("latency=1.2") == "latency=1.2ms"
    assert parse_target("flops=0.5, latency=0.8 ms") == "latency=0.8ms,flops=0.5"   # a budget is the primary
    assert target_dict("latency=1.2ms,flops=0.5") == {"metric": "latency", "ms": 1.2, "also": {"flops": 0.5}}
    for bad, message in [("latency=fast", "not a number of milliseconds"), ("latency=-1ms", "positive"),
                         ("latency=1ms,latency=2ms", "named twice"), ("speed=1ms", "latency=Xms")]:
        with pytest.raises(UserError, match=message) as e:
            parse_target(bad)
        one_line(e)


def test_greedy_hits_the_budget_on_step_widths(table_path):
    """Budgets across the reachable range: predicted ms at or under the budget, close to it, and
    every group on a plateau top (never inside a plateau, where fewer channels save nothing)."""
    from compress.prune.budget import select
    model, groups, cost = cost_with_table(table_path)
    # (whether this freshly measured table has plateaus depends on the host's noise; the tiled-table
    # test below checks the rounding on plateaus that are known to be there)
    steps = cost.latency.step_counts()
    entry = lt.load_table(table_path).entry("tflite", 1)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.size, generator=gen) for g in groups}
    for share in (0.2, 0.5, 0.8):
        budget = budget_between(cost, share)
        masks = select(scores, cost, "latency", 1 - budget / cost.dense("latency"), 0.1)
        k = cost.vector(masks)
        ms = cost.resource("latency", k)
        assert ms <= budget * (1 + 1e-9)
        # within one step of the budget: no group's next step up would still fit
        up = [s[s > kg] for s, kg in zip(steps, k)]
        for g, nxt in enumerate(up):
            if len(nxt):
                trial = k.copy()
                trial[g] = nxt[0]
                assert cost.resource("latency", trial) > budget or share == 0.8   # fill took what fit
        for kg, s in zip(k, steps):
            assert kg in s, (kg, s)
        assert ms == pytest.approx(entry.predict_keep({g.name: int(v) for g, v in zip(groups, k)}))


def test_learned_rounding_on_a_tiled_runtime(table_path, tmp_path):
    """The same table as if the runtime padded input channels to tiles of 8 (as int8 GEMMs on ARM
    do): every group then keeps a multiple of 8 (or all its channels), the budget still holds."""
    from compress.prune.budget import select
    raw = json.loads(table_path.read_text())
    for axis in ("in", "out"):
        raw["entries"][0]["axes"][axis] = {"flat": [[1, 8], [9, 16], [17, 24], [25, 32]], "sweep_max": 32,
                                           "period": 8, "last_top": 32}
    tiled = tmp_path / "tiled.json"
    tiled.write_text(json.dumps(raw))
    _, groups, cost = cost_with_table(tiled)
    for steps, size in zip(cost.latency.step_counts(), cost.sizes):
        assert steps[-1] == size and set(steps) <= set(range(8, size + 1, 8)), steps
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in groups}
    for share in (0.3, 0.6):
        budget = budget_between(cost, share)
        k = cost.vector(select(scores, cost, "latency", 1 - budget / cost.dense("latency"), 0.1))
        assert cost.resource("latency", k) <= budget * (1 + 1e-9)
        assert all(v % 8 == 0 for v in k), k


def test_joint_latency_and_flops(table_path):
    from compress.prune.budget import achieved, select
    model, groups, cost = cost_with_table(table_path)
    budget = budget_between(cost, 0.7)
    scores = {g.name: -torch.arange(g.size, dtype=torch.float32) for g in groups}
    flops = flops_beyond_budget(cost, budget)
    masks = select(scores, cost, "latency", 1 - budget / cost.dense("latency"), 0.1, also={"flops": flops})
    assert cost.resource("latency", masks) <= budget * (1 + 1e-9)
    assert flops - 1e-9 <= achieved(cost, "flops", masks) <= flops + 0.01


def test_latency_of_many_selections_at_once(table_path):
    from compress.prune.budget import allowed_widths
    _, _, cost = cost_with_table(table_path)
    rng = np.random.default_rng(0)
    rows = np.array([[rng.choice(w) for w in allowed_widths(cost, 0.1)] for _ in range(20)])
    assert np.allclose(cost.resources("latency", rows), [cost.resource("latency", r) for r in rows], rtol=1e-12)


BUSY_TABLE = Path(__file__).parent / "data" / "tiny-latency-table-busy-host.json"


def test_joint_target_on_coarse_steps_lands_within_a_point():
    """A real table of the tiny net, profiled while two training runs had the cores (so its steps
    are coarse and uneven), 50 random score draws at a 0.0238 ms budget: the greedy passes, the
    exchange and the second settle stop past flops + 1 pp for some (10 of 50 at 0.75) although
    selections inside exist; the exhaustive search over the 3,150 selections finds one each time."""
    from compress.prune.budget import achieved, select
    _, _, cost = cost_with_table(BUSY_TABLE)
    for flops in (0.7, 0.75):
        for seed in range(50):
            g = torch.Generator().manual_seed(seed)
            scores = {n: torch.rand(int(s), generator=g) for n, s in zip(cost.names, cost.sizes)}
            masks = select(scores, cost, "latency", 1 - 0.0238 / cost.dense("latency"), 0.1, also={"flops": flops})
            assert cost.resource("latency", masks) <= 0.0238 * (1 + 1e-9), (flops, seed)
            assert flops - 1e-9 <= achieved(cost, "flops", masks) <= flops + 0.01, (flops, seed)


def test_an_infeasible_joint_target_on_few_widths_fails_in_one_line():
    """Every selection tried, none meets both: the error names what the closest greedy one removes."""
    from compress.prune.budget import select
    _, _, cost = cost_with_table(BUSY_TABLE)
    with pytest.raises(UserError, match="cannot hit latency=.*, flops=0.3 within 1% at once") as e:
        select(positional_scores(cost), cost, "latency", 1 - budget_between(cost, 0.2) / cost.dense("latency"),
               0.1, also={"flops": 0.3})
    one_line(e)


PLATEAU_TABLE = Path(__file__).parent / "data" / "tiny-latency-table-plateaus.json"


@pytest.mark.parametrize("share", [0.2, 0.35])
def test_remove_pass_steps_past_plateaus(share, monkeypatch):
    """A real table of the tiny net, profiled on an AMD EPYC while a VGG-16 trained on both cores.
    Its steps are where a layer gets faster at its neighbours' dense widths; at these budgets the
    remove pass reached widths (8, 8, 16) where every group's next step down saved nothing and
    stopped, "cannot reach latency", with the budget in reach. A group on such a plateau now steps
    down to its nearest width that saves: the greedy alone (no exhaustive fallback) lands."""
    import compress.prune.budget as budget_module
    monkeypatch.setattr(budget_module, "EXHAUSTIVE_LIMIT", 0)
    _, _, cost = cost_with_table(PLATEAU_TABLE)
    budget = budget_between(cost, share)
    masks = budget_module.select(positional_scores(cost), cost, "latency", 1 - budget / cost.dense("latency"), 0.1)
    assert 0.9 * budget <= cost.resource("latency", masks) <= budget * (1 + 1e-9)


def test_pruner_api_prunes_to_a_budget(table_path):
    import compress
    model = tiny_resnet()
    _, _, cost = cost_with_table(table_path)
    budget = round(budget_between(cost, 0.5), 4)
    pruner = compress.Pruner(model, EXAMPLE, f"latency={budget}ms", "l1", latency_table=str(table_path))
    assert pruner.target["ms"] == budget and pruner.target["table"]["format"] == "tflite"   # its only entry
    assert pruner.target["table"]["sha256"] == sha256(table_path)
    assert pruner.predicted_ms() <= budget
    slim = pruner.extract()
    assert slim(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    summary = pruner.summary()
    assert summary["target"]["metric"] == "latency" and 0 < summary["target"]["reduction"] < 1
    json.dumps(summary)   # report.json holds it


def test_unreachable_budget_and_foreign_tables_fail_before_training(table_path):
    import compress
    from compress.models import create_model
    with pytest.raises(UserError, match=r"latency budget 0.0001 ms is unreachable .* predicted at [0-9.]+ ms at "
                                        r"the fastest") as e:
        compress.Pruner(tiny_resnet(), EXAMPLE, "latency=0.0001ms", "seed", latency_table=str(table_path),
                        epochs=2, steps_per_epoch=4)
    one_line(e)
    with pytest.raises(UserError, match="not below the dense network's predicted"):
        compress.Pruner(tiny_resnet(), EXAMPLE, "latency=1000ms", "l1", latency_table=str(table_path))
    with pytest.raises(UserError, match="does not fit this network"):       # another model
        compress.Pruner(create_model("resnet20", 10, 0.25), torch.zeros(2, 3, 16, 16), "latency=1ms", "l1",
                        latency_table=str(table_path))
    with pytest.raises(UserError, match="is for another network .* 16 channels there, 8 here"):   # another width
        compress.Pruner(tiny_resnet(10, 0.5), EXAMPLE, "latency=1ms", "l1", latency_table=str(table_path))
    with pytest.raises(UserError, match=r"profiled for input \[3, 16, 16\], this network takes \[3, 32, 32\]"):
        compress.Pruner(tiny_resnet(), torch.zeros(2, 3, 32, 32), "latency=1ms", "l1", latency_table=str(table_path))
    with pytest.raises(UserError, match=r"no entry for tflite-int8 x1 \(it has: tflite x1\)") as e:
        compress.Pruner(tiny_resnet(), EXAMPLE, "latency=1ms", "l1", latency_table=str(table_path),
                        format="tflite-int8", threads=1)
    one_line(e)
    with pytest.raises(UserError, match="give both"):
        compress.Pruner(tiny_resnet(), EXAMPLE, "flops=0.5", "l1", latency_table=str(table_path))
    dense = lt.load_table(table_path).entry("tflite", 1).predict_keep(None)   # a reachable budget: round_to is what is refused
    with pytest.raises(UserError, match="drop --round-to"):
        compress.Pruner(tiny_resnet(), EXAMPLE, f"latency={dense * 0.9:.6f}ms", "l1", latency_table=str(table_path),
                        round_to=8)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def data16(tmp_path_factory, small_cifar_dir) -> Path:
    """Real CIFAR-10 images cropped to 16x16, the input size the table was profiled at."""
    path = tmp_path_factory.mktemp("cifar16") / "cifar16.npz"
    with np.load(small_cifar_dir / "cifar10.npz", allow_pickle=False) as z:
        np.savez(path, x_train=z["x_train"][:256, 8:24, 8:24], y_train=z["y_train"][:256],
                 x_test=z["x_test"][:128, 8:24, 8:24], y_test=z["y_test"][:128], classes=z["classes"])
    return path


def tiny16(data: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--dataset", str(data), "--preset", "smoke", "--epochs", "2", "--train-subset", "192",
            "--test-subset", "128", "--calib", "32", "--batch-size", "32", "--no-progress", *extra]


def flops_beyond_budget(cost, budget: float, margin: float = 0.1) -> float:
    """A FLOPs reduction about `margin` past what the latency budget alone removes, which some
    selection under the budget reaches within 1 pp (the table is measured afresh on each host, so
    this moves with it): in a joint target it is then FLOPs that binds."""
    from compress.prune.budget import achieved, allowed_widths, select
    alone = achieved(cost, "flops", select(positional_scores(cost), cost, "latency",
                                           1 - budget / cost.dense("latency"), 0.1))
    widths = allowed_widths(cost, 0.1)
    ks = np.stack(np.meshgrid(*widths, indexing="ij"), axis=-1).reshape(-1, len(widths))
    reached = 1 - cost.resources("flops", ks)[cost.resources("latency", ks) <= budget] / cost.dense("flops")
    nearest = reached[np.argmin(np.abs(reached - (alone + margin)))]
    return math.floor(nearest * 100) / 100


@pytest.mark.parametrize("method, target", [("seed", "latency={}ms"), ("l1", "latency={}ms,flops={}"),
                                            ("uniform", "latency={}ms")])
def test_cli_prunes_to_a_latency_budget(method, target, table_path, data16, tmp_path, capsys):
    from compress.cli import main
    _, _, cost = cost_with_table(table_path)
    budget = round(budget_between(cost, 0.5), 4)
    flops = flops_beyond_budget(cost, budget)
    out = tmp_path / method
    assert main(tiny16(data16, "--method", method, "--target", target.format(budget, flops), "--latency-table",
                       str(table_path), "--threads", "1", "--out", str(out))) == 0
    assert f"(budget {budget:g} ms" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    lat = report["latency"]
    assert lat["budget_ms"] == budget and lat["format"] == "tflite" and lat["threads"] == 1
    assert lat["path"] == str(table_path.resolve()) and len(lat["sha256"]) == 64
    assert lat["predicted_ms"] <= budget and lat["within_budget"] and lat["dense_predicted_ms"] > budget
    assert report["target"]["metric"] == "latency" and report["achieved"]["latency_ms"] == lat["predicted_ms"]
    if method == "l1":
        assert flops <= report["achieved"]["flops_reduction"] <= flops + 0.01   # FLOPs bind, latency is under
    # the cut network's widths sit on the table's steps
    arch = json.loads((out / "arch.json").read_text())
    steps = dict(zip(cost.names, cost.latency.step_counts()))
    for name, s in steps.items():
        assert arch["modules"][name]["out"] in s, name


@pytest.mark.parametrize("extra, message", [
    (("--target", "latency=0.0001ms"), "latency budget 0.0001 ms is unreachable"),
    (("--target", "latency=1ms", "--format", "tflite-int8"), "no entry for --format tflite-int8 (it has: tflite x1)"),
    (("--target", "latency=1ms", "--model", "vgg11"), "is for model 'tests.latency_fixture:tiny_resnet', not 'vgg11'"),
    (("--target", "flops=0.5"), "--latency-table prices a latency budget"),
    (("--target", "latency=1ms", "--latency-table", "missing.json"), "latency table not found"),
])
def test_cli_refuses_before_training(extra, message, table_path, data16, tmp_path, capsys):
    from compress.cli import main
    args = tiny16(data16, "--method", "seed", "--latency-table", str(table_path), "--out", str(tmp_path / "run"))
    args += list(extra)   # argparse: the last --model / --latency-table wins
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    main_no_table = tiny16(data16, "--method", "seed", "--target", "latency=1ms", "--out", str(tmp_path / "r2"))
    assert main(main_no_table) == 2 and "needs --latency-table" in capsys.readouterr().err


def test_resume_refuses_a_changed_latency_table():
    from compress.cli import check_resumed_table

    target = {"metric": "latency", "ms": 1.0, "table": {"path": "t.json", "sha256": "b" * 64}}
    check_resumed_table({"latency_table_sha256": "b" * 64}, target)           # the same table
    check_resumed_table({"latency_table_sha256": None}, {"metric": "flops"})   # no table either time
    check_resumed_table({}, target)                                           # a checkpoint from before the check
    with pytest.raises(UserError, match="t.json is not the table this run started with") as e:
        check_resumed_table({"latency_table_sha256": "a" * 64}, target)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(UserError, match="not the table"):
        check_resumed_table({"latency_table_sha256": "a" * 64}, {"metric": "flops"})


def test_removed_branch_priced_alike_by_compress_and_device_bench(table_path):
    """A branch removed whole (--remove-branches) costs 0 ms in the pruner's pricing, and the table
    predicts the cut network from its arch.json and from report.json's layer widths (what a
    bundle's manifest carries) at the same ms: before, the removed convs read as dense."""
    import compress
    from compress.flops import count
    from compress.prune.surgery import arch_of
    from compress.report import layer_widths

    model = tiny_resnet(10, 1.0)
    _dead = dict(model.named_modules())["bn2"]
    _dead.weight.data.zero_()   # the branch contributes nothing: the chooser removes it
    _dead.bias.data.zero_()
    calibration = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    table = lt.load_table(table_path)
    dense_ms = table.entry("tflite", 1).predict_keep(None)
    without = table.entry("tflite", 1).predict_keep({"conv1": 0})   # the budget: the branch gone, all else whole
    pruner = compress.Pruner(model.eval(), EXAMPLE, f"latency={without + 1e-5:.6f}ms", "l1",
                             latency_table=str(table_path), remove_branches=True, calibration=calibration)
    masks = pruner.masks
    assert pruner.depth_record["removed"] == ["conv1"]
    predicted = pruner.predicted_ms(masks)
    slim = pruner.extract()
    arch = arch_of(slim, MODEL, 10, 1.0)
    entry = table.entry("tflite", 1)
    assert entry.predict(arch["modules"]) == pytest.approx(predicted, rel=1e-9)
    widths = layer_widths(count(model, (1, 3, 16, 16)), count(slim, (1, 3, 16, 16)), arch)
    assert {w.name: w.after for w in widths}["conv1"] == 0
    keep = table.keep_from_widths({w.name: w.after for w in widths})
    assert entry.predict_keep(keep) == pytest.approx(predicted, rel=1e-9) and predicted < dense_ms
