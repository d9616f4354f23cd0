"""``semicon-sweep data``: write a synthetic MSD / nnU-Net v2 dataset, or read and check one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.common import bad_input, data_app


@data_app.command("synth")
def data_synth(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the dataset.")],
    cases: Annotated[int, typer.Option(help="Number of volumes.")] = 24,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    layout: Annotated[
        str,
        typer.Option(help="Folder layout: msd (Medical Segmentation Decathlon) or nnunet (v2)."),
    ] = "msd",
    channels: Annotated[
        int,
        typer.Option(
            help="Input channels: MRI-like contrasts of the same anatomy (MSD: one 4D image "
            "per case; nnunet: <case>_0000 .. _000N files)."
        ),
    ] = 1,
    ct: Annotated[
        bool,
        typer.Option(
            "--ct",
            help="Make the last channel CT-like (Hounsfield units, declared CT; train it with "
            "dataset.ct_window).",
        ),
    ] = False,
) -> None:
    """Write a synthetic dataset (Hippocampus-like, 3 classes) in the MSD or nnU-Net v2 layout."""
    from trainers.synthetic import channel_names, write_synthetic_msd

    with bad_input(ValueError):
        root = write_synthetic_msd(
            folder, num_cases=cases, seed=seed, layout=layout, channels=channels, ct=ct
        )
    names = ", ".join(channel_names(channels, ct))
    typer.echo(
        f"{root}: {cases} synthetic cases (seed {seed}, {layout} layout, "
        f"{channels} channel{'s' * (channels != 1)}: {names})"
    )


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="An MSD or nnU-Net v2 dataset folder.")],
) -> None:
    """Read and check every case of an MSD or nnU-Net v2 folder; print a summary."""
    from trainers.msd import iter_checked, scan_layout

    with bad_input():
        layout = scan_layout(root)
        summary = describe_volumes(
            root, iter_checked(layout, ()), layout.class_names, layout.channels
        )
    typer.echo(summary)


def describe_volumes(
    root: Path,
    volumes: Iterable[Any],
    names: dict[int, str] | None = None,
    channels: tuple[str, ...] = ("",),
) -> str:
    """Cases, classes with their voxel shares, the range of volume shapes and, for more than
    one channel or a CT one, the channels. ``volumes`` is read once, one volume at a time;
    ``names``: class id -> name (default: dataset.json's); ``channels``: their modalities."""
    import numpy as np

    from trainers.msd import is_ct

    names = _class_names(root) if names is None else names
    voxels: Counter[int] = Counter()
    shape_list = []
    for volume in volumes:
        values, counts = np.unique(volume.label, return_counts=True)
        voxels.update({int(v): int(c) for v, c in zip(values, counts, strict=True)})
        shape_list.append(volume.label.shape)
        del volume
    total = sum(voxels.values()) or 1
    classes = ", ".join(
        f"{value} {names.get(value, '?')} ({100 * count / total:.2f}%)"
        for value, count in sorted(voxels.items())
    )
    shapes = np.array(shape_list)
    extent = " x ".join(
        f"{lo}-{hi}" if lo != hi else f"{lo}"
        for lo, hi in zip(shapes.min(0), shapes.max(0), strict=True)
    )
    return "\n".join(
        [
            f"{root}: {len(shape_list)} cases, all readable and consistent",
            f"classes: {classes}",
            f"shapes: {extent}",
        ]
        + (
            [
                f"channels: {len(channels)} ({', '.join(name or '?' for name in channels)})"
                + ("; CT channels need dataset.ct_window" if any(map(is_ct, channels)) else "")
            ]
            if len(channels) > 1 or any(map(is_ct, channels))
            else []
        )
    )


def _class_names(root: Path) -> dict[int, str]:
    from trainers.msd import declared_class_names

    return declared_class_names(root) or {}
