"""`bkd extract-teacher`: run the teacher once and cache its targets in a Zarr store."""

from __future__ import annotations

import click

from stages.common import build_config, config_options, one_line_errors, run_standalone


@click.command("extract-teacher")
@config_options
@click.option("--store", default=None, help="Override extract.store (the Zarr store path).")
@click.option("--views", type=int, default=None, help="Override extract.views: K cached views per training sample.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--overwrite", is_flag=True, help="Replace a store that was built for another run.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Shards in parallel on a dask LocalCluster of this many processes (1: in this process).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the shards on an existing dask cluster, e.g. tcp://head:8786.")
@click.option("--plan", "plan", is_flag=True,
              help="Print what the store will hold and take (bytes per array, free space, time) and write nothing.")
@click.option("--samples", "samples", multiple=True, metavar="SPLIT=N",
              help="With --plan: plan for N samples of SPLIT (e.g. train=1281167), calibrated on the data here.")
@click.option("--calibration-rows", "calibration_rows", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --plan: calibrate on the first N rows of each split (default: extract.chunk_size).")
@click.option("--json", "as_json", is_flag=True, help="With --plan: print the plan as JSON.")
@click.option("--ignore-free-space", is_flag=True,
              help="Start even when the projected store exceeds the free space at its local destination.")
@one_line_errors
def main(config_path, overrides, store, views, device, overwrite, workers, scheduler, plan, samples,
         calibration_rows, as_json, ignore_free_space):
    """Write the teacher's pre-logits and logits for each split into a sharded Zarr v3 store.

    Re-running the same command after an interruption writes only the missing shards.
    """
    from pipeline.distributed import resolve_device
    from pipeline.errors import BkdError
    from pipeline.teacher.extract import extract_teacher

    if (samples or as_json or calibration_rows) and not plan:
        raise BkdError("--samples, --calibration-rows and --json go with --plan")
    counts = {}
    for item in samples:
        split, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise BkdError(f"--samples takes SPLIT=N with N a positive integer, got {item!r}")
        counts[split] = int(count)
    cfg = build_config(config_path, overrides, **{"extract.store": store, "extract.views": views})
    unknown = sorted(set(counts) - set(cfg.extract.splits))
    if unknown:
        raise BkdError(f"--samples names split {unknown[0]!r}, which this extraction does not write "
                       f"(extract.splits: {', '.join(cfg.extract.splits)})")
    if plan:
        import json

        from pipeline.teacher.plan import format_plan, plan_store

        made = plan_store(cfg, resolve_device(device), counts, calibration_rows)
        click.echo(json.dumps(made.to_dict(), indent=2) if as_json else format_plan(made))
        return
    result = extract_teacher(cfg, resolve_device(device), overwrite=overwrite, workers=workers, scheduler=scheduler,
                             check_space=not ignore_free_space)
    click.echo(f"{result['store']}: complete ({result['shards_written']} shards written); identity {result['identity']}")


if __name__ == "__main__":
    run_standalone(main)
