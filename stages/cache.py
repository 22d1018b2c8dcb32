"""`bkd cache info|verify STORE`: inspect and check a teacher-target store."""

from __future__ import annotations

import json
import sys

import click

from stages.common import one_line_errors, run_standalone


@click.group("cache")
def main():
    """Inspect teacher-target stores."""


@main.command("info")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@one_line_errors
def info(store, as_json):
    """Print the manifest and sizes of STORE."""
    from pipeline.targets import store_info

    data = store_info(store)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    m = data["manifest"]
    click.echo(f"store:      {data['path']} ({'complete' if data['complete'] else 'INCOMPLETE'})")
    click.echo(f"teacher:    {m['teacher']['model']} sha256={m['teacher']['checkpoint_sha256']}")
    click.echo(f"dataset:    {m['dataset']}")
    click.echo(f"transform:  {m['transform']}")
    click.echo(f"arrays:     {m['arrays']} features={m['teacher']['num_features']} classes={m['teacher']['num_classes']}")
    click.echo(f"codecs:     {', '.join(f'{target}: {codec}' for target, codec in data['codecs'].items())}")
    for split, s in data["splits"].items():
        click.echo(f"{split:>10}: {s['samples']} samples x {s['views']} views, shards {s['shards_complete']}/{s['shards_total']} complete, "
                   f"fingerprint {m['splits'][split]['fingerprint'][:16]}")
    click.echo(f"on disk:    {data['bytes_on_disk']} bytes ({data['bytes_per_sample']:.1f} bytes/sample, "
               f"{data['bytes_per_sample_view']:.1f} bytes/sample/view)")
    click.echo(f"created:    {m['created']} with {m['versions']}")


@main.command("verify")
@click.argument("store", type=click.Path())
@one_line_errors
def verify(store):
    """Read every chunk of STORE; exit 1 naming each bad shard."""
    from pipeline.targets import verify_store

    bad = checked = 0
    whole = []
    for split, shard, problem in verify_store(store):
        if shard is None:  # the store, or a split, as a whole
            whole.append(problem)
            click.echo(f"bad {f'split {split}' if split else 'store'}: {problem}", err=True)
            continue
        checked += 1
        if problem:
            bad += 1
            click.echo(f"bad shard {split}/{shard}: {problem}", err=True)
    if bad or whole:
        click.echo(f"{store}: {bad} of {checked} shards bad" + (f", {len(whole)} problem(s) of the store as a whole"
                                                                 if whole else ""), err=True)
        sys.exit(1)
    click.echo(f"{store}: all {checked} shards ok")


if __name__ == "__main__":
    run_standalone(main)
