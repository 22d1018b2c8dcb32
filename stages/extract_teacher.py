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
@one_line_errors
def main(config_path, overrides, store, views, device, overwrite, workers, scheduler):
    """Write the teacher's pre-logits and logits for each split into a sharded Zarr v3 store.

    Re-running the same command after an interruption writes only the missing shards.
    """
    from pipeline.distributed import resolve_device
    from pipeline.teacher.extract import extract_teacher

    cfg = build_config(config_path, overrides, **{"extract.store": store, "extract.views": views})
    result = extract_teacher(cfg, resolve_device(device), overwrite=overwrite, workers=workers, scheduler=scheduler)
    click.echo(f"{result['store']}: complete ({result['shards_written']} shards written)")


if __name__ == "__main__":
    run_standalone(main)
