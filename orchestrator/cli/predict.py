"""The commands that put a finished sweep's model to use: ``predict`` (NIfTI label maps of a
folder of images) and ``export`` (TorchScript plus a JSON record of its preprocessing), both
from the plan recorded in ``sweep.json`` (``orchestrator.predict``; no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import PROG, app, bad_input, log, report_invalid
from orchestrator.cli.read import _check_device, recorded_plan

TrialOption = Annotated[
    str | None,
    typer.Option("--trial", help="The trial whose model to use (a trial_id of the trials table)."),
]
BestOption = Annotated[
    str | None,
    typer.Option(
        "--best",
        metavar="METRIC",
        help="Else the complete trial with the highest METRIC in its final metrics "
        "(default val_dice = val_dice_pooled_mean).",
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]


def _errors() -> tuple[type[BaseException], ...]:
    from orchestrator.evaluate import ExternalEvalError
    from orchestrator.predict import PredictError

    return (PredictError, ExternalEvalError)


@app.command()
def predict(
    storage: Annotated[Path, typer.Argument(help="The finished sweep's storage folder.")],
    images: Annotated[
        Path, typer.Option("--images", help="A folder of NIfTI images (*.nii.gz, *.nii).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the label maps (<case>.nii.gz).")],
    trial: TrialOption = None,
    best: BestOption = None,
    force: ForceOption = False,
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 64,
    device: Annotated[
        str,
        typer.Option(
            metavar="[cpu|cuda|cuda:N]", callback=_check_device, help="Device for the model."
        ),
    ] = "cpu",
) -> None:
    """Segment every image of a folder with one trial's fine-tuned model.

    Writes one uint8 label map per image, <case>.nii.gz, with the image's shape and affine,
    preprocessed as the model was trained (orientation, per-channel normalisation, slices along
    the node's axis resampled to its spacing and resized to its image_size; logits taken back
    to the image's grid before the argmax). nnU-Net channel files <case>_0000, <case>_0001, ...
    are one case. Nothing is written unless every image was read; existing maps are kept unless
    --force. Prints each path.
    """
    from orchestrator.predict import choose_trial, predict_folder
    from orchestrator.store import invalid_nodes

    with bad_input(*_errors()):
        plan, store = recorded_plan(storage)
        report_invalid(invalid_nodes(plan, store))
        chosen = choose_trial(plan, store, trial, best)
        paths = predict_folder(
            plan, store, chosen, images, out, force, batch_size, device, progress=log
        )
    log(f"{PROG}: wrote {len(paths)} label maps to {out}")
    for path in paths:
        typer.echo(str(path))


@app.command()
def export(
    storage: Annotated[Path, typer.Argument(help="The finished sweep's storage folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="The TorchScript file (FILE.pt; FILE.json beside it).")
    ],
    trial: TrialOption = None,
    best: BestOption = None,
    force: ForceOption = False,
) -> None:
    """Export one trial's fine-tuned model as TorchScript that loads without this project.

    FILE.pt: torch.jit.load(FILE.pt) maps (B, 1, H, W) float32 in [0, 1] to logits (B, K, H, W).
    FILE.json: the preprocessing it expects (axis, image_size, normalisation, classes), the
    trial's grid point, its node key and the sweep's spec hash. Prints both paths.
    """
    from orchestrator.predict import choose_trial, export_model

    with bad_input(*_errors()):
        plan, store = recorded_plan(storage)
        chosen = choose_trial(plan, store, trial, best)
        paths = export_model(plan, store, chosen, out, force)
    log(f"{PROG}: exported {chosen.reason} (node {chosen.node.key})")
    for path in paths:
        typer.echo(str(path))
