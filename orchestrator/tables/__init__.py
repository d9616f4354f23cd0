"""Results as tables: collected from the stage store, written as parquet, formatted like the paper.

Schema (stable column names; a later ``tabulate`` can always re-read an old sweep):

``trials``: one row per trial, failed and unfinished ones included.
    ``sweep``, ``trial_id``; one column per grid axis that is a dotted path (e.g.
    ``stages.local.temperature``); ``method``, ``label_fraction``, ``seed``, ``split``;
    ``status``: ``ok`` (every stage complete), ``failed`` (the trial's last stage failed),
    ``skipped`` (an earlier stage it builds on failed, so its last stage never ran) or
    ``pending`` (not finished, no failure recorded); ``error`` (the failure's message, naming
    the stage and node key; None when ok/pending); ``key_global``, ``key_local``,
    ``key_finetune`` (None where the method has no such stage); every final metric of the
    finetune node (``test_dice_pooled_mean``, ``test_dice_volume_mean``, per class
    ``test_dice_pooled_c1`` ..., ``val_*``: Dice at the model's input size, ``image_size``
    squared, as the reference code reports it; and on each test volume's own voxel grid,
    ``trainers.native``: ``test_native_dice_{pooled,volume}_{c1..,mean}``,
    ``test_native_hd95_{c1..,mean}`` in mm, ``test_native_nsd_{c1..,mean}`` (surface Dice at
    ``native_nsd_tolerance_mm``), ``test_native_hd95_undefined``, ``test_native_n_volumes``
    and the seconds they took, ``native_eval_seconds``; absent for nodes run with
    ``native_eval: false`` or stored before these existed; not ``fused``, so a fused sweep's
    table has an unfused one's columns); ``wall_s_<stage>`` and ``gpu_s_<stage>`` for each
    stage (``wall_s``/``gpu_s`` of the node's ``metrics.json`` when the worker recorded them,
    else the sum of the epochs' ``seconds``/``gpu_s``; NaN when unknown); ``torch_version``,
    ``ray_version``, ``numpy_version``, ``git_commit`` (recorded in ``sweep.json`` at launch);
    ``steps_<stage>`` (optimiser steps the stage ran); ``converged`` (the fine-tuning node's
    validation curve no longer improved in its last quarter, ``orchestrator.stats.converged``;
    None when undecidable), ``val_gain_last_quarter`` (that improvement) and ``collapsed`` (some
    class's pooled test Dice < 0.05).
``epochs``: one row per (node key, epoch): ``sweep``, ``key``, ``stage``, ``epoch``, ``loss``,
    ``val_dice_mean``, ``slices_per_s``, ``seconds`` and whatever else the stage reported. After
    a restart an epoch may have been recorded twice; the last record wins.
``paired`` (written by ``tabulate --baseline``): ``orchestrator.stats.PAIRED_COLUMNS``, one row
    per method and label fraction: mean paired difference to the baseline, 95 % CI, wins / n.
``summary``: ok trials grouped over seed and split by ``method``, ``label_fraction`` and the
    other grid axes: ``n_trials`` and, for each ``test_*`` metric ``m``, ``m_mean``, ``m_std``
    (sample standard deviation, NaN for a single trial) and ``m_n`` (trials with a value).

The package reads as the data flows: ``build`` (the store's nodes and epochs into the three
tables), ``files`` (their parquet files under ``<storage>/tables/``), ``paper`` (the paper-style
table of a metric, and its rendering as text, Markdown, LaTeX or CSV).
"""

from orchestrator.tables.build import (
    ENVIRONMENT_COLUMNS,
    EPOCH_COLUMNS,
    STATUSES,
    Tables,
    collect,
    node_progress,
    node_state,
    path_axes,
    summarise,
    trial_columns,
    trial_status,
)
from orchestrator.tables.files import (
    TABLE_NAMES,
    parquet_safe,
    read_tables,
    tables_stale,
    write_paired,
    write_tables,
)
from orchestrator.tables.paper import (
    CELL_MARKS,
    CELL_NOTES,
    METHOD_ORDER,
    TABLE_FORMATS,
    comment_prefix,
    format_table,
    paired_table,
    paper_table,
    render_table,
)

__all__ = [
    "CELL_MARKS",
    "CELL_NOTES",
    "ENVIRONMENT_COLUMNS",
    "EPOCH_COLUMNS",
    "METHOD_ORDER",
    "STATUSES",
    "TABLE_FORMATS",
    "TABLE_NAMES",
    "Tables",
    "collect",
    "comment_prefix",
    "format_table",
    "node_progress",
    "node_state",
    "paired_table",
    "paper_table",
    "render_table",
    "parquet_safe",
    "path_axes",
    "read_tables",
    "summarise",
    "tables_stale",
    "trial_columns",
    "trial_status",
    "write_paired",
    "write_tables",
]
