"""The CLI without Ray: dry runs, bad input (exit 2, one line, nothing written), launch with a
stand-in executor, status, tabulate and the data commands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import Plan, build_plan
from orchestrator.spec import load_spec
from orchestrator.store import StageStore
from tests.orchestrator.specs import CLI_SPEC, write_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("semicon-sweep: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_dry_run_json_is_one_object_and_writes_nothing(runner: CliRunner, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    storage = tmp_path / "storage"
    result = runner.invoke(
        app, ["launch", str(spec_path), "--dry-run", "--json", "--storage", str(storage)]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"trials", "stages", "storage", "spec_hash", "invalid", "axes", "points"}
    assert summary["trials"] == 8
    assert summary["axes"] == {"method": 2, "label_fraction": 2, "seed": 2}
    assert summary["points"]["t0001"] == {"method": "global", "label_fraction": 0.2, "seed": 1}
    assert summary["invalid"] == {}
    assert summary["stages"] == {
        "global": {"nodes": 2, "to_run": 2},
        "local": {"nodes": 4, "to_run": 4},
        "finetune": {"nodes": 8, "to_run": 8},
    }
    assert summary["storage"] == str(storage)
    assert summary["spec_hash"] == load_spec(spec_path).spec_hash
    assert not storage.exists()


def test_dry_run_json_stdout_in_a_real_process(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    storage = tmp_path / "storage"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "launch",
            str(spec_path),
            "--dry-run",
            "--json",
            "--storage",
            str(storage),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["trials"] == 8  # the whole stdout is one JSON document
    assert out.stdout.count("\n") == 1
    assert not storage.exists()


def test_dry_run_counts_done_nodes(runner: CliRunner, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    storage = tmp_path / "storage"
    plan = build_plan(load_spec(spec_path, overrides={"storage": str(storage)}))
    StageStore(storage).write_result(plan.levels[0][0], {"w": torch.zeros(1)}, {})
    before = sorted(p.relative_to(storage) for p in storage.rglob("*"))
    result = runner.invoke(app, ["launch", str(spec_path), "--dry-run", "--storage", str(storage)])
    assert result.exit_code == 0
    assert "8 trials" in result.stdout and "nothing was run or written" in result.stdout
    global_line = next(line for line in result.stdout.splitlines() if line.startswith("global "))
    assert global_line.split() == ["global", "2", "1", "1"]
    assert sorted(p.relative_to(storage) for p in storage.rglob("*")) == before


def test_dry_run_shows_linked_values(runner: CliRunner, tmp_path: Path) -> None:
    """The shipped example: each linked group is one axis, its keys' values in every trial."""
    spec_path = REPO / "search_spaces" / "linked_example.yaml"
    args = ["launch", str(spec_path), "--dry-run", "--storage", str(tmp_path / "storage")]
    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[2] == (
        "axes: stages.local.temperature (2), "
        "label_fraction+stages.finetune.steps+stages.finetune.val_every_steps (2), "
        "stages.local.block_size+stages.local.batch_size (2)"
    )
    first = next(line for line in lines if line.startswith("t0000 "))
    assert (
        "stages.local.temperature=0.1, label_fraction=0.2, stages.finetune.steps=120, "
        "stages.finetune.val_every_steps=30, stages.local.block_size=4, stages.local.batch_size=2"
    ) in first
    summary = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert summary["trials"] == 8 and len(summary["points"]) == 8
    assert summary["axes"]["stages.local.block_size+stages.local.batch_size"] == 2
    assert summary["points"]["t0007"] == {
        "stages.local.temperature": 0.5,
        "label_fraction": 0.5,
        "stages.finetune.steps": 240,
        "stages.finetune.val_every_steps": 60,
        "stages.local.block_size": 8,
        "stages.local.batch_size": 8,
    }
    assert summary["stages"]["global"]["nodes"] == 1
    assert not (tmp_path / "storage").exists()


BAD = {
    "unknown key": (CLI_SPEC + "epoch: 3\n", "epoch: unknown key"),
    "bad temperature": (
        CLI_SPEC + "grid:\n  stages.local.temperature: [-1]\n",
        "grid.stages.local.temperature",
    ),
    "unknown method": (
        CLI_SPEC.replace("method: [global, global+local_block]", "method: simclr"),
        "method",
    ),
    "malformed": ("name: x\nmodel: [1, 2\n", "malformed YAML at line"),
    "linked cases naming other keys": (
        CLI_SPEC + "linked:\n  - - {stages.local.stride: 2, model.depth: 2}\n"
        "    - {stages.local.stride: 4}\n",
        "linked[0][1]: every case of a group names the keys of its first",
    ),
    "tune sampler": (
        CLI_SPEC + "grid:\n  stages.local.temperature: {loguniform: [0.01, 1]}\n",
        "grid.stages.local.temperature: loguniform samples at random",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_spec_exits_2_with_one_line(
    runner: CliRunner, tmp_path: Path, case: str, dry_run: bool
) -> None:
    text, key = BAD[case]
    spec_path = write_spec(tmp_path, text)
    storage = tmp_path / "storage"
    args = ["launch", str(spec_path), "--storage", str(storage)] + (
        ["--dry-run"] if dry_run else []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert str(spec_path) in line and key in line
    assert result.stdout == ""
    assert not storage.exists()


def test_json_needs_dry_run(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--json"])
    assert result.exit_code == 2
    assert "--json" in one_error_line(result.stderr)


def fake_executor(
    fail: Callable[[Plan, str], bool] | None = None,
    cluster_error: bool = False,
    leave: Callable[[Plan, str], bool] | None = None,
) -> types.ModuleType:
    """A stand-in for orchestrator.execute: runs nothing, writes results like the real one;
    nodes for which ``leave`` holds stay pending (a sweep still running)."""
    module = types.ModuleType("orchestrator.execute")

    class ClusterError(ValueError):
        pass

    def run_sweep(
        plan: Plan, store: StageStore, address: str | None = None, progress=None, reuse: bool = True
    ):
        if address == "unreachable:1":
            raise ClusterError(f"cannot reach the Ray cluster at {address}: connection refused")
        if cluster_error:
            raise ClusterError("cannot connect to a local Ray instance: no")
        for level in plan.levels:
            for key in level:
                node = plan.nodes[key]
                if store.is_complete(key) or (node.parent and not store.is_complete(node.parent)):
                    continue
                if leave is not None and leave(plan, key):
                    continue
                store.write_node(node)
                if fail is not None and fail(plan, key):
                    store.write_error(key, "RuntimeError: injected")
                    continue
                dice = 0.5 + (node.label_fraction or 0) / 2 + node.seed / 100
                store.write_result(
                    key, {"w": torch.zeros(1)}, {"test_dice_pooled_mean": dice, "wall_s": 1.0}
                )
        progress("fake sweep done")

    module.ClusterError = ClusterError  # type: ignore[attr-defined]
    module.run_sweep = run_sweep  # type: ignore[attr-defined]
    return module


def test_launch_runs_collects_and_exits_0(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor())
    storage = tmp_path / "storage"
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 0, result.stderr
    assert "fake sweep done" in result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["method", "\\", "label_fraction", "0.2", "0.5"]
    assert "global + local (block)" in result.stdout and "± " in result.stdout  # display names
    assert {p.name for p in (storage / "tables").iterdir()} == {
        "trials.parquet",
        "epochs.parquet",
        "summary.parquet",
    }
    assert json.loads((storage / "sweep.json").read_text())["name"] == "cli-test"


def test_launch_exits_1_when_a_trial_failed(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(plan: Plan, key: str) -> bool:
        node = plan.nodes[key]
        return node.stage == "finetune" and node.label_fraction == 0.5 and node.seed == 1

    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor(fail))
    storage = tmp_path / "storage"
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 1
    assert "failed 2" in result.stderr  # both methods' (0.5, seed 1) fine-tuning


def test_storage_conflict_exits_2_before_writing(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor())
    storage = tmp_path / "storage"
    other_path = write_spec(tmp_path, CLI_SPEC.replace("seed: [0, 1]", "seed: 5"), "other.yaml")
    other = load_spec(other_path, overrides={"storage": str(storage)})
    StageStore(storage).claim_sweep(other)
    before = (storage / "sweep.json").read_bytes()
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "holds sweep 'cli-test'" in line and "--force" in line
    assert (storage / "sweep.json").read_bytes() == before
    assert not (storage / "stages").exists()
    forced = runner.invoke(
        app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage), "--force"]
    )
    assert forced.exit_code == 0, forced.stderr


@pytest.mark.parametrize("where", ["probe", "connect"])
def test_cluster_error_exits_2_and_leaves_no_trace(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setitem(
        sys.modules, "orchestrator.execute", fake_executor(cluster_error=where == "connect")
    )
    storage = tmp_path / "storage"
    args = ["launch", str(write_spec(tmp_path)), "--storage", str(storage)]
    if where == "probe":
        args += ["--address", "unreachable:1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    # the Ray connection is made after the launch line: progress may precede the error
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("semicon-sweep: error:")
    ]
    assert "Ray" in one_error_line("\n".join(errors))
    assert "Traceback" not in result.stderr
    assert not storage.exists()


@pytest.fixture
def finished(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A storage folder after a launch where seed 1's global pretraining failed."""

    def fail(plan: Plan, key: str) -> bool:
        return plan.nodes[key].stage == "global" and plan.nodes[key].seed == 1

    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor(fail))
    storage = tmp_path / "storage"
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 1
    return storage


def test_status(runner: CliRunner, finished: Path) -> None:
    result = runner.invoke(app, ["status", str(finished)])
    assert result.exit_code == 0, result.stderr
    assert "sweep 'cli-test'" in result.stdout
    assert "8 trials: ok 4, failed 0, skipped 4, pending 0" in result.stdout
    rows = {
        line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()
    }
    assert rows["stage"] == ["nodes", "complete", "failed", "skipped", "started", "waiting"] + [
        "pending"
    ]
    assert rows["global"] == ["2", "1", "1", "0", "0", "0", "0"]
    assert rows["local"] == ["4", "2", "0", "2", "0", "0", "0"]  # seed 1's: parent failed
    assert rows["finetune"] == ["8", "4", "0", "4", "0", "0", "0"]


def test_status_shows_started_and_waiting_nodes(runner: CliRunner, tmp_path: Path) -> None:
    """A node with epochs recorded but no result is started (with its progress and an
    estimate of the time left); one whose parent is not complete is waiting."""
    spec_path = write_spec(tmp_path)
    spec = load_spec(spec_path, overrides={"storage": str(tmp_path / "s")})
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    key = plan.levels[0][0]
    node = plan.nodes[key]
    total = node.config["epochs"]
    for epoch in (1, 2):
        store.append_epoch(key, {"epoch": epoch, "steps": epoch * 3, "loss": 1.0, "seconds": 2.0})
    result = runner.invoke(app, ["status", spec.storage])
    assert result.exit_code == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line}
    assert rows[node.stage][4] == "1"  # started
    children = sum(1 for n in plan.nodes.values() if n.parent == key)
    assert int(rows["local"][5]) == children  # waiting on the started global node
    line = next(line for line in result.stdout.splitlines() if line.startswith("started:"))
    left = (total - 2) * 2
    assert f"{key[:8]}" in line and f"epoch 2/{total}, 2.0 s/epoch" in line
    assert line.endswith(f"about 0:{left // 60:02d}:{left % 60:02d} left")


def test_status_without_sweep(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2
    assert "no sweep.json" in one_error_line(result.stderr)


def test_tabulate_formats_and_out(runner: CliRunner, finished: Path, tmp_path: Path) -> None:
    (finished / "tables" / "trials.parquet").unlink()  # missing tables are re-collected
    result = runner.invoke(app, ["tabulate", str(finished), "--format", "md"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| method \\ label_fraction | 0.2 | 0.5 |"
    assert lines[2].startswith("| global (SimCLR) | **0.600 (1)** |")  # display name; best: bold
    assert (finished / "tables" / "trials.parquet").is_file()
    out = tmp_path / "table.tex"
    result = runner.invoke(app, ["tabulate", str(finished), "--format", "latex", "--out", str(out)])
    assert result.exit_code == 0
    assert out.read_text().startswith("\\begin{tabular}")
    by_seed = runner.invoke(app, ["tabulate", str(finished), "--by", "seed", "--format", "csv"])
    assert by_seed.stdout.splitlines()[0] == "method,label_fraction \\ seed,0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "test_hd95"], "metric 'test_hd95'"),
        (["--by", "nope"], "--by 'nope'"),
    ],
)
def test_tabulate_bad_options(
    runner: CliRunner, finished: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["tabulate", str(finished), *args])
    assert result.exit_code == 2
    assert message in one_error_line(result.stderr)


def test_data_synth_and_check(runner: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", str(root), "--cases", "3", "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    assert (root / "dataset.json").is_file()
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0, result.stderr
    assert "3 cases" in result.stdout
    assert "1 anterior" in result.stdout and "2 posterior" in result.stdout

    label = sorted((root / "labelsTr").iterdir())[1]
    label.write_bytes(label.read_bytes()[:100])  # a truncated, corrupt file
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 2
    assert label.name in one_error_line(result.stderr)


def test_data_check_missing_folder(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(tmp_path / "absent")])
    assert result.exit_code == 2
    assert "absent" in one_error_line(result.stderr)


def test_data_synth_bad_arguments(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--cases", "0"])
    assert result.exit_code == 2
    assert "num_cases" in one_error_line(result.stderr)


def test_tabulate_baseline_prints_and_writes_paired_differences(
    runner: CliRunner, finished: Path
) -> None:
    result = runner.invoke(app, ["tabulate", str(finished), "--baseline", "global"])
    assert result.exit_code == 0, result.stderr
    assert "mean paired difference to global" in result.stdout
    paired = pd.read_parquet(finished / "tables" / "paired.parquet")
    assert {
        "method",
        "label_fraction",
        "baseline",
        "n",
        "delta_mean",
        "ci95_low",
        "ci95_high",
        "wins",
    } <= set(paired.columns)
    assert (paired["baseline"] == "global").all() and "global" not in set(paired["method"])
    bad = runner.invoke(app, ["tabulate", str(finished), "--baseline", "tcsm"])
    assert bad.exit_code == 2
    assert "--baseline 'tcsm'" in one_error_line(bad.stderr)


# ---- the command line itself: fast help, flags, choices, version -------------------------------

HEAVY = ("torch", "nibabel", "ray", "pandas", "matplotlib")


def test_help_and_dry_run_import_no_torch(tmp_path: Path) -> None:
    """``--help`` imports none of the heavy packages; reading a spec and planning (a dry run)
    import no torch, nibabel or Ray (this is what makes ``--help`` take well under a second)."""
    spec_path, storage = write_spec(tmp_path), tmp_path / "storage"
    code = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from orchestrator.cli import app
        runner = CliRunner()
        for args in (["--help"], ["launch", "--help"], ["tabulate", "--help"], ["data", "--help"]):
            assert runner.invoke(app, args).exit_code == 0, args
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        args = ["launch", {str(spec_path)!r}, "--dry-run", "--storage", {str(storage)!r}]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        print(sorted(m for m in ("torch", "nibabel", "ray") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "[]"]


def test_boolean_options_are_flags(runner: CliRunner) -> None:
    result = runner.invoke(app, ["launch", "--help"])
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    options = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  --")]
    assert {"--dry-run", "--json", "--force", "--no-reuse"} <= set(options)
    for flag in ("--dry-run", "--json", "--force", "--no-reuse"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"  {flag} "))
        assert line.split()[1][0].isupper(), line  # the help text follows: no value to give


def test_format_and_device_offer_their_choices(runner: CliRunner, tmp_path: Path) -> None:
    from orchestrator.cli import TableFormat
    from orchestrator.tables import TABLE_FORMATS

    assert tuple(f.value for f in TableFormat) == TABLE_FORMATS
    assert "<text|md|latex|csv>" in runner.invoke(app, ["tabulate", "--help"]).stdout
    bad = runner.invoke(app, ["tabulate", str(tmp_path), "--format", "html"])
    assert bad.exit_code == 2
    assert "'html' is not one of 'text', 'md', 'latex', 'csv'" in bad.stderr
    assert "[cpu|cuda|cuda:N]" in runner.invoke(app, ["evaluate", "--help"]).stdout
    bad = runner.invoke(app, ["evaluate", str(tmp_path), "--data", ".", "--device", "gpu"])
    assert bad.exit_code == 2
    assert "'gpu': one of cpu, cuda, cuda:N" in bad.stderr


def test_version(runner: CliRunner) -> None:
    from importlib import metadata

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"semicon-sweep {metadata.version('semicon-sweep')}\n"


# ---- tabulate and plot on a running sweep and on committed tables -----------------------------


@pytest.fixture
def running(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A storage folder of a sweep under way: seed 1's fine-tuning nodes have not run yet."""

    def leave(plan: Plan, key: str) -> bool:
        return plan.nodes[key].stage == "finetune" and plan.nodes[key].seed == 1

    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor(leave=leave))
    storage = tmp_path / "running"
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 1  # not every trial ok
    return storage


def test_tabulate_a_running_sweep_shows_the_finished_trials(
    runner: CliRunner, running: Path
) -> None:
    result = runner.invoke(app, ["tabulate", str(running), "--format", "csv"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "method \\ label_fraction,0.2,0.5"
    assert lines[1].startswith("global (SimCLR),0.600 (1),")  # seed 0 only
    assert lines[-1] == "# 4 of 8 trials finished; not shown: pending 4"


def test_plot_a_running_sweep(runner: CliRunner, running: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plot", str(running), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.stderr
    assert "4 of 8 trials finished; not shown: pending 4" in result.stderr
    assert (tmp_path / "plots" / "dice_vs_label_fraction__test_dice_pooled_mean.png").is_file()


def test_tabulate_before_any_trial_finished(runner: CliRunner, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    spec = load_spec(write_spec(tmp_path), overrides={"storage": str(storage)})
    StageStore(storage).claim_sweep(spec, plan=build_plan(spec))
    result = runner.invoke(app, ["tabulate", str(storage)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "no finished trials" in result.stderr and "pending 8" in result.stderr


def test_tables_without_their_sweep_re_render(
    runner: CliRunner, finished: Path, tmp_path: Path
) -> None:
    """A folder holding only ``tables/`` (results committed without their stage store)."""
    committed = tmp_path / "committed"
    (committed / "tables").mkdir(parents=True)
    for table in (finished / "tables").iterdir():
        (committed / "tables" / table.name).write_bytes(table.read_bytes())
    expected = runner.invoke(app, ["tabulate", str(finished), "--format", "md"]).stdout
    result = runner.invoke(app, ["tabulate", str(committed), "--format", "md"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected
    result = runner.invoke(app, ["plot", str(committed)])
    assert result.exit_code == 0, result.stderr
    assert (committed / "plots" / "dice_vs_label_fraction__test_dice_pooled_mean.png").is_file()
    assert sorted(p.name for p in committed.iterdir()) == ["plots", "tables"]


def test_committed_reproduction_tables_re_render(runner: CliRunner, tmp_path: Path) -> None:
    source = REPO / "results" / "reproductions" / "paper_hippocampus_cpu" / "tables"
    copy = tmp_path / "paper" / "tables"
    copy.mkdir(parents=True)
    for table in source.glob("*.parquet"):
        (copy / table.name).write_bytes(table.read_bytes())
    result = runner.invoke(app, ["tabulate", str(copy.parent), "--format", "md"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("| method \\ label_fraction | 0.05 | 0.1 | 0.2 |")
    assert "| global + local (block) |" in result.stdout
