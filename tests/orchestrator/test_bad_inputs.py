"""Every bad input the CLI answers with one line and exit 2, in one catalogue.

Each case builds its input in a fresh folder, runs one CLI command in-process and must get:
exit code 2, one stderr line ``semicon-sweep: error: ...`` containing the expected fragment
(the key or file it names), nothing on stdout, and every file that existed before untouched.
Ray is never reached (``orchestrator.execute.ray_session`` raises if it is).

docs/BAD_INPUTS.md is generated from this catalogue with the messages the CLI really prints
(``python -m tests.orchestrator.test_bad_inputs`` rewrites it; a test checks that it is
current)::

    SEMICON_DATA= python -m tests.orchestrator.test_bad_inputs
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import execute
from orchestrator.cli import app
from tests.orchestrator.specs import write_spec
from trainers.synthetic import write_synthetic_msd

DOC = Path(__file__).resolve().parents[2] / "docs" / "BAD_INPUTS.md"

SPEC = """
name: bad-inputs
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: [global, global+local_block]
label_fraction: [0.2, 0.5]
seed: 0
stages:
  local: {block_size: 8}
"""


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(folder)`` writes it and returns the command's arguments."""

    group: str
    what: str
    build: Callable[[Path], list[str]]
    names: str  # a fragment the one error line must contain (with ``{tmp}`` for the folder)


def _spec(folder: Path, text: str = SPEC, *, storage: bool = True) -> list[str]:
    return ["launch", str(write_spec(folder, text))] + (
        ["--storage", str(folder / "storage")] if storage else []
    )


def _spec_with(extra: str) -> Callable[[Path], list[str]]:
    return lambda folder: _spec(folder, SPEC + extra)


def _spec_replacing(old: str, new: str) -> Callable[[Path], list[str]]:
    assert old in SPEC
    return lambda folder: _spec(folder, SPEC.replace(old, new))


def _msd_spec(
    damage: Callable[[Path], None], layout: str = "msd", channels: int = 1, settings: str = ""
) -> Callable[[Path], list[str]]:
    """A spec over a small synthetic MSD (or nnU-Net v2) folder at ``folder/data`` of
    ``channels`` channels damaged by ``damage``; ``settings``: more dataset keys ("k: v, ...")."""

    def build(folder: Path) -> list[str]:
        root = write_synthetic_msd(
            folder / "data", num_cases=6, shape=(16, 18, 12), layout=layout, channels=channels
        )
        damage(root)
        text = SPEC.replace("{kind: synthetic, image_size: 32, synthetic_cases: 8}", "{}")
        extra = f", {settings}" if settings else ""
        dataset = f"dataset: {{kind: msd, root: {root}{extra}}}"
        return _spec(folder, text.replace("dataset: {}", dataset))

    return build


def _declare_ct(root: Path) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "CT"}
    (root / "dataset.json").write_text(json.dumps(meta))


def _channel_of_another_shape(root: Path) -> None:
    import nibabel as nib
    import numpy as np

    path = root / "imagesTr" / "synth_004_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 18, 5), np.float32), np.eye(4)), str(path))


def _truncate(root: Path) -> None:
    path = root / "imagesTr" / "synth_003.nii.gz"
    path.write_bytes(path.read_bytes()[:200])


def _swap_label(root: Path) -> None:
    """The label map of case 2 replaced by case 2's label map cut to fewer slices."""
    import nibabel as nib
    import numpy as np

    path = root / "labelsTr" / "synth_002.nii.gz"
    image = nib.load(str(path))
    cut = np.asarray(image.dataobj)[..., :-2]
    nib.save(nib.Nifti1Image(cut, image.affine), str(path))


def _label_out_of_range(root: Path) -> None:
    import nibabel as nib
    import numpy as np

    path = root / "labelsTr" / "synth_001.nii.gz"
    image = nib.load(str(path))
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), str(path))


def _not_gzip(root: Path) -> None:
    (root / "labelsTr" / "synth_004.nii.gz").write_bytes(gzip.compress(b"not a nifti file"))


def _two_channel_names(root: Path) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T2", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))


def _second_channel_file(root: Path) -> None:
    shutil.copy(
        root / "imagesTr" / "synth_002_0000.nii.gz", root / "imagesTr" / "synth_002_0001.nii.gz"
    )


def _four_d_image(root: Path) -> None:
    import nibabel as nib
    import numpy as np

    path = root / "imagesTr" / "synth_001.nii.gz"
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), str(path))


def _first_channel_only(root: Path) -> None:
    import nibabel as nib
    import numpy as np

    path = root / "imagesTr" / "synth_003.nii.gz"
    image = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine), str(path))


def _storage_file(folder: Path) -> list[str]:
    (folder / "results").write_text("not a folder")
    return [*_spec(folder, storage=False), "--storage", str(folder / "results")]


def _storage_under_file(folder: Path) -> list[str]:
    (folder / "results").write_text("not a folder")
    return [*_spec(folder, storage=False), "--storage", str(folder / "results" / "sweep")]


def _other_sweep(folder: Path) -> list[str]:
    (folder / "storage").mkdir()
    (folder / "storage" / "sweep.json").write_text(
        json.dumps({"name": "another", "spec_hash": "0" * 16})
    )
    return _spec(folder)


def _locked(folder: Path) -> list[str]:
    from orchestrator.lock import acquire_lock

    (folder / "storage").mkdir()
    lock = acquire_lock(folder / "storage")  # held by this (live) process
    _HELD.append(lock)
    return _spec(folder)


_HELD: list = []  # locks and servers a case holds while its command runs


def _http_server(folder: Path) -> list[str]:
    """An --address where something answers, but HTTP/1.1, not Ray's gRPC."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _HELD.append(_Stopper(server))
    return [*_spec(folder), "--address", f"127.0.0.1:{server.server_address[1]}"]


@dataclass
class _Stopper:
    server: object

    def release(self) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]
        self.server.server_close()  # type: ignore[attr-defined]


def _no_sweep(command: str) -> Callable[[Path], list[str]]:
    def build(folder: Path) -> list[str]:
        (folder / "empty").mkdir()
        return [command, str(folder / "empty")]

    return build


def _predict(
    prepare: Callable[[Path, Path], None] | None = None, *extra: str, out: str = "labels"
) -> Callable[[Path], list[str]]:
    """``predict`` on a finished sweep (``folder/sweep``) and ``folder/imagesTs`` (3 images),
    after ``prepare(folder, images)``; ``extra`` arguments may name ``{trial_1.0}`` etc."""

    def build(folder: Path) -> list[str]:
        from tests.orchestrator.finished import images_folder, trial_of, write_finished_sweep

        plan, store = write_finished_sweep(folder, storage="sweep")
        images = images_folder(folder / "imagesTs")
        if prepare is not None:
            prepare(folder, images)
        trials = {f"{{trial_{f}}}": trial_of(plan, f) for f in (0.2, 0.5, 1.0)}
        args = [arg for arg in extra]
        for name, trial_id in trials.items():
            args = [arg.replace(name, trial_id) for arg in args]
        command = ["predict", str(store.root), "--images", str(images), "--out", str(folder / out)]
        return [*command, *args]

    return build


def _two_channels(folder: Path, images: Path) -> None:
    import nibabel as nib
    import numpy as np

    data = np.random.default_rng(0).random((16, 16, 4, 2), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(images / "case_d.nii.gz"))


def _two_channel_files(folder: Path, images: Path) -> None:
    import nibabel as nib
    import numpy as np

    for path in images.iterdir():
        path.unlink()
    data = np.random.default_rng(0).random((16, 16, 4), dtype=np.float32)
    for channel in range(2):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(images / f"case_{channel:04d}.nii.gz"))


def _cut_image(folder: Path, images: Path) -> None:
    path = images / "case_b.nii.gz"
    path.write_bytes(path.read_bytes()[:-150])


def _no_images(folder: Path, images: Path) -> None:
    for path in images.iterdir():
        path.rename(folder / path.name)
    (images / "README.txt").write_text("images go here")


def _out_is_a_file(folder: Path, images: Path) -> None:
    (folder / "labels").write_text("not a folder")


def _export_exists(folder: Path) -> list[str]:
    from tests.orchestrator.finished import write_finished_sweep

    _, store = write_finished_sweep(folder, storage="sweep")
    (folder / "model.pt").write_bytes(b"an earlier export")
    return ["export", str(store.root), "--out", str(folder / "model.pt")]


CASES: dict[str, Case] = {
    case.what: case
    for case in [
        # the spec
        Case("spec", "spec file missing", lambda f: ["launch", str(f / "nope.yaml")], "nope.yaml"),
        Case("spec", "malformed YAML", lambda f: _spec(f, "name: x\nmodel: [1, 2\n"), "malformed"),
        Case("spec", "unknown top-level key", _spec_with("epoch: 3\n"), "epoch: unknown key"),
        Case(
            "spec",
            "unknown stage setting (with a suggestion)",
            _spec_replacing("local: {block_size: 8}", "local: {blok_size: 8}"),
            "stages.local.blok_size",
        ),
        Case(
            "spec",
            "a key written twice",
            _spec_with("seed: 1\n"),
            "seed",
        ),
        Case(
            "spec",
            "wrong type",
            _spec_replacing("base_channels: 4", "base_channels: four"),
            "model.base_channels",
        ),
        Case(
            "spec",
            "dataset.ct_window not a [lo, hi] pair",
            _spec_replacing("synthetic_cases: 8}", "synthetic_cases: 8, ct_window: [200, -100]}"),
            "dataset.ct_window: must be [lo, hi]",
        ),
        Case(
            "spec",
            "dataset.spacing not two positive numbers",
            _spec_replacing("synthetic_cases: 8}", "synthetic_cases: 8, spacing: [1]}"),
            "dataset.spacing",
        ),
        Case(
            "spec",
            "unknown dataset.reorient",
            _spec_replacing("synthetic_cases: 8}", "synthetic_cases: 8, reorient: LPS}"),
            "dataset.reorient",
        ),
        Case(
            "spec",
            "impossible temperature",
            _spec_with("grid:\n  stages.local.temperature: [-1]\n"),
            "grid.stages.local.temperature",
        ),
        Case(
            "spec",
            "label fraction outside (0, 1]",
            _spec_replacing("label_fraction: [0.2, 0.5]", "label_fraction: [0.2, 1.5]"),
            "label_fraction",
        ),
        Case(
            "spec",
            "unknown method",
            _spec_replacing("method: [global, global+local_block]", "method: simclr"),
            "method",
        ),
        Case(
            "spec",
            "undefined ${VAR}",
            _spec_replacing("name: bad-inputs", "name: ${SEMICON_UNSET_VARIABLE}"),
            "SEMICON_UNSET_VARIABLE",
        ),
        Case(
            "spec",
            "grid beyond the trial limit",
            _spec_replacing(
                "seed: 0",
                "seed: [" + ", ".join(str(i) for i in range(100)) + "]\n"
                "grid:\n  stages.finetune.lr: ["
                + ", ".join(f"0.00{i + 1}" for i in range(9))
                + "]\n  stages.finetune.batch_size: ["
                + ", ".join(str(i + 1) for i in range(10))
                + "]",
            ),
            "--allow-large-grid",
        ),
        Case(
            "spec",
            "a Ray Tune sampler instead of a grid",
            _spec_with("grid:\n  stages.local.temperature: {loguniform: [0.01, 1]}\n"),
            "grid.stages.local.temperature",
        ),
        Case(
            "spec",
            "linked cases naming different keys",
            _spec_with(
                "linked:\n  - - {stages.finetune.lr: 0.01, stages.finetune.steps: 10}\n"
                "    - {stages.finetune.lr: 0.02}\n"
            ),
            "linked[0]",
        ),
        Case(
            "spec",
            "a node larger than this machine (local Ray)",
            _spec_with("resources: {cpus_per_worker: 4096}\n"),
            "resources.cpus_per_worker",
        ),
        Case(
            "spec",
            "fused fine-tunes without bundles",
            _spec_with("resources: {fuse_finetunes: true}\n"),
            "resources.fuse_finetunes",
        ),
        Case(
            "spec",
            "--json without --dry-run",
            lambda f: [*_spec(f), "--json"],
            "--json",
        ),
        # the data
        Case(
            "data",
            "dataset folder missing",
            _spec_replacing(
                "{kind: synthetic, image_size: 32, synthetic_cases: 8}",
                "{kind: msd, root: /nonexistent/Task04}",
            ),
            "/nonexistent/Task04",
        ),
        Case("data", "truncated NIfTI", _msd_spec(_truncate), "synth_003.nii.gz"),
        Case("data", "not a NIfTI file", _msd_spec(_not_gzip), "synth_004.nii.gz"),
        Case(
            "data",
            "label map that does not match its image",
            _msd_spec(_swap_label),
            "synth_002.nii.gz",
        ),
        Case(
            "data",
            "label value outside the declared classes",
            _msd_spec(_label_out_of_range),
            "synth_001.nii.gz",
        ),
        Case(
            "data",
            "label file missing",
            _msd_spec(lambda root: (root / "labelsTr" / "synth_005.nii.gz").unlink()),
            "synth_005",
        ),
        Case(
            "data",
            "an MSD image of more channels than dataset.json declares (4D)",
            _msd_spec(_four_d_image),
            "synth_001.nii.gz: 2 channels",
        ),
        Case(
            "data",
            "an MSD 4D image of fewer channels than declared",
            _msd_spec(_first_channel_only, channels=2),
            "synth_003.nii.gz: 1 channel",
        ),
        Case(
            "data",
            "nnU-Net v2 channel file missing (two channels declared)",
            _msd_spec(_two_channel_names, layout="nnunet"),
            "synth_000_0001.nii.gz: channel file missing",
        ),
        Case(
            "data",
            "nnU-Net v2 channel file beyond the declared channels",
            _msd_spec(_second_channel_file, layout="nnunet"),
            "synth_002_0001.nii.gz",
        ),
        Case(
            "data",
            "nnU-Net v2 channel file of another shape than channel 0",
            _msd_spec(_channel_of_another_shape, layout="nnunet", channels=2),
            "synth_004_0001.nii.gz: shape (16, 18, 5) differs",
        ),
        Case(
            "data",
            "a CT channel without dataset.ct_window",
            _msd_spec(_declare_ct),
            "channel 0 is CT; set dataset.ct_window",
        ),
        Case(
            "data",
            "dataset.ct_window on a dataset without a CT channel",
            _msd_spec(lambda root: None, settings="ct_window: [-100, 200]"),
            "dataset.ct_window: ",
        ),
        Case(
            "data",
            "nnU-Net v2 image file missing",
            _msd_spec(
                lambda root: (root / "imagesTr" / "synth_003_0000.nii.gz").unlink(), layout="nnunet"
            ),
            "synth_003_0000.nii.gz",
        ),
        # the storage folder
        Case("storage", "storage is a file", _storage_file, "results: not a folder"),
        Case("storage", "storage under a file", _storage_under_file, "results/sweep: not a folder"),
        Case("storage", "storage holds another sweep", _other_sweep, "storage"),
        Case("storage", "storage held by a running launch", _locked, "in use by a running launch"),
        Case("storage", "status of a folder without a sweep", _no_sweep("status"), "empty"),
        Case("storage", "plot of a folder without a sweep", _no_sweep("plot"), "empty"),
        # predict and export: a finished sweep's model on new images
        Case(
            "predict",
            "images folder missing",
            _predict(lambda f, images: images.rename(f / "moved")),
            "imagesTs: images folder not found",
        ),
        Case("predict", "no NIfTI files in the images folder", _predict(_no_images), "no NIfTI"),
        Case("predict", "a truncated image", _predict(_cut_image), "case_b.nii.gz"),
        Case(
            "predict",
            "a 4D image of two channels",
            _predict(_two_channels),
            "expects 1 channel, case_d.nii.gz has 2",
        ),
        Case(
            "predict",
            "nnU-Net channel files of two channels for a one-channel model",
            _predict(_two_channel_files),
            "expects 1 channel, case_0000.nii.gz has 2 channel files",
        ),
        Case("predict", "unknown --trial", _predict(None, "--trial", "t9999"), "--trial t9999"),
        Case(
            "predict",
            "a trial that is not complete",
            _predict(None, "--trial", "{trial_1.0}"),
            "not complete (status failed",
        ),
        Case("predict", "--out is a file", _predict(_out_is_a_file), "labels: not a folder"),
        Case(
            "predict",
            "--out is the images folder",
            _predict(None, out="imagesTs"),
            "is the --images folder",
        ),
        Case(
            "predict",
            "--best metric no trial records",
            _predict(None, "--best", "dice"),
            "--best dice",
        ),
        Case("predict", "export over an existing file", _export_exists, "model.pt: exists"),
        # the cluster
        Case(
            "cluster",
            "unreachable --address",
            lambda f: [*_spec(f), "--address", "127.0.0.1:1"],
            "127.0.0.1:1",
        ),
        Case("cluster", "--address of something that is not Ray", _http_server, "not a Ray"),
    ]
}


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """No Ray, no inherited ${VAR}, no lock left held after the case."""
    saved = execute.ray_session

    @contextlib.contextmanager
    def no_ray(address: str | None) -> Iterator[None]:
        raise AssertionError("a bad input reached Ray")
        yield  # pragma: no cover

    execute.ray_session = no_ray
    os.environ.pop("SEMICON_UNSET_VARIABLE", None)
    try:
        yield
    finally:
        execute.ray_session = saved
        while _HELD:
            _HELD.pop().release()


def _one_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("semicon-sweep: error: "), stderr
    assert stdout == ""
    return lines[0]


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(case: Case, folder: Path, *extra: str) -> tuple[int, str, str, dict, dict]:
    """Build the case in ``folder``, run its command (plus ``extra`` arguments); (exit code,
    stdout, stderr, files before, files after)."""
    folder.mkdir(parents=True, exist_ok=True)
    with _isolated():
        args = [*case.build(folder), *extra]
        before = _snapshot(folder)
        result = CliRunner().invoke(app, args)
        after = _snapshot(folder)
    return result.exit_code, result.stdout, result.stderr, before, after


@pytest.mark.parametrize("what", list(CASES))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(what: str, tmp_path: Path) -> None:
    case = CASES[what]
    code, stdout, stderr, before, after = run_case(case, tmp_path)
    assert case.names in _one_line(code, stdout, stderr)
    assert after.keys() >= before.keys() and all(after[p] == before[p] for p in before)
    assert not (tmp_path / "storage" / "sweep.json").exists() or case.group == "storage"


_OWNER = "host <host>, pid <pid>, started <time>"


def _normalise(message: str, folder: Path) -> str:
    """``message`` without what changes from run to run: the folder, pids, times, ports."""
    message = message.replace(str(folder), "<tmp>")
    message = re.sub(r"host \S+, pid \d+, started [\d-]+ [\d:]+", _OWNER, message)
    message = re.sub(r"kill \d+", "kill <pid>", message)
    return re.sub(r"127\.0\.0\.1:\d{3,}", "127.0.0.1:<port>", message)


NOT_DRY_RUN = (
    "--json without --dry-run",
    "status of a folder without a sweep",
    "plot of a folder without a sweep",
)


@pytest.mark.parametrize("what", list(CASES))
def test_dry_run_reports_the_same_line(what: str, tmp_path: Path) -> None:
    """``launch --dry-run`` finds every problem the launch finds, with the same message."""
    case = CASES[what]
    launch = run_case(case, tmp_path / "launch")
    if what in NOT_DRY_RUN or case.group == "predict":
        pytest.skip("not a launch, or a flag only the dry run takes")
    dry = run_case(case, tmp_path / "dry", "--dry-run")
    if what == "storage held by a running launch":  # a dry run only reads: it notes the owner
        assert dry[0] == 0 and "is in use by a launch (host" in dry[2]
        return
    expected = _normalise(_one_line(*launch[:3]), tmp_path / "launch")
    assert _normalise(_one_line(*dry[:3]), tmp_path / "dry") == expected
    assert dry[3] == dry[4]  # nothing written


def render() -> str:
    """docs/BAD_INPUTS.md: every case of the catalogue with the message the CLI prints now."""
    rows = []
    for case in CASES.values():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp).resolve()
            code, _, stderr, _, _ = run_case(case, folder)
        message = _normalise(stderr.strip(), folder)
        message = message.removeprefix("semicon-sweep: error: ").replace("|", "\\|")
        rows.append(f"| {case.group} | {case.what} | {code} | `{message}` |")
    return (
        "# Bad input: what the CLI says\n\n"
        "Generated by `python -m tests.orchestrator.test_bad_inputs` from the catalogue in\n"
        "`tests/orchestrator/test_bad_inputs.py`, which checks each case: exit code 2, this one\n"
        "line on stderr (`semicon-sweep: error: ` omitted below), nothing on stdout, no file\n"
        "that existed before changed, and Ray never started. `launch --dry-run` prints the same\n"
        "line for every launch case (checked too), except a storage held by a running launch:\n"
        "a dry run only reads, so it notes the owner and goes on. `<tmp>` is the case's folder.\n\n"
        "| input | case | exit | message |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def test_a_grpc_server_passes_the_address_probe() -> None:
    """The probe's other side: a server answering the HTTP/2 preface with SETTINGS is taken for
    Ray (so the probe refuses only what cannot be a Ray cluster)."""
    import socket
    import threading

    from orchestrator.session import check_address

    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with listener:
        check_address(f"127.0.0.1:{listener.getsockname()[1]}")
    thread.join(timeout=5)


def test_docs_table_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/BAD_INPUTS.md is stale: python -m tests.orchestrator.test_bad_inputs"
    )


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
