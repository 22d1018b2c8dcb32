"""`bkd cache info|verify|sign STORE`: inspect, check and sign a teacher-target store."""

from __future__ import annotations

import json
import sys

import click

from pipeline.errors import BkdError
from stages.common import one_line_errors, run_standalone


@click.group("cache")
def main():
    """Inspect, check and sign teacher-target stores."""


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
    signature = data["signature"]
    if signature is None:
        click.echo("signed:     no")
    else:
        checked = (f"checked: {signature['problem']}" if signature["problem"] else "checked: ok") \
            if signature["checked"] else "not checked: no signing key set"
        click.echo(f"signed:     key id {signature['key_id']} ({checked})")


@main.command("verify")
@click.argument("store", type=click.Path())
@one_line_errors
def verify(store):
    """Read every chunk of STORE; exit 1 naming each bad shard (with a signing key set, a store not
    signed with it is bad too)."""
    bad, whole, checked = _verify(store)
    if bad or whole:
        sys.exit(1)
    click.echo(f"{store}: all {checked} shards ok")


@main.command("sign")
@click.argument("store", type=click.Path())
@click.option("--force", is_flag=True, help="Sign a store whose signature under this key no longer matches it "
                                          "(changed since it was signed); without it, one is refused.")
@one_line_errors
def sign(store, force):
    """Verify every chunk of STORE, then sign it with the key BKD_STORE_KEY or BKD_STORE_KEY_FILE sets."""
    from pipeline.targets.fsutil import store_lock
    from pipeline.targets.manifest import open_group
    from pipeline.targets.signing import (CHANGED, KEY_ENV, KEY_FILE_ENV, sign_store, signature_problem,
                                          signed_digests, store_key)

    key = store_key()
    if key is None:
        raise BkdError(f"no signing key: set {KEY_ENV} (the key) or {KEY_FILE_ENV} (a file holding it)")
    with store_lock(store):
        root = open_group(store, "r+")
        problem = signature_problem(root, store, key)[0]
        if problem and CHANGED in problem and not force:  # verifying cannot tell a forgery with digests to match
            raise BkdError(f"{store}: not signed, {problem}: its rows or digests were rewritten after it was signed "
                           "with this key; rebuild it (`bkd extract-teacher --overwrite`), or pass --force if you "
                           "know why it changed")
        content = signed_digests(root, store)[0]  # what is verified below is what gets signed
        bad, whole, checked = _verify(store, signing=True)
        if bad or whole:
            raise BkdError(f"{store}: not signed, it does not verify (listed above)")
        click.echo(f"{store}: all {checked} shards ok; signed (key id {sign_store(root, store, key, content)})")


def _verify(store, signing: bool = False) -> tuple[int, list[str], int]:
    """Run verify_store, printing each problem; (bad shards, problems of the whole store, shards checked).
    `signing`: the store is about to be signed, so its signature's state is no problem."""
    from pipeline.targets import verify_store

    bad = checked = 0
    whole = []
    for split, shard, problem in verify_store(store, signature=not signing):
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
    return bad, whole, checked


if __name__ == "__main__":
    run_standalone(main)
