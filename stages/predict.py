"""`bkd predict`: classify images with a trained student, from its weights file alone."""

from __future__ import annotations

import json

import click

from stages.common import one_line_errors, run_standalone


@click.command("predict")
@click.argument("student", type=click.Path())
@click.argument("inputs", type=click.Path(exists=True))
@click.option("--device", default="cpu", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input.")
@one_line_errors
def main(student, inputs, device, as_json):
    """Print the class (and its probability) of each of INPUTS with STUDENT.

    STUDENT is a run folder (runs/students/mixed) or its student.safetensors; INPUTS a folder of
    images, one image file, or a .npy array of raw images (N, C, H, W) or (N, H, W) uint8. Images
    are converted to the student's channels and resized to its input size.
    """
    from pipeline.distributed import resolve_device
    from pipeline.student.predict import load_student, predict_raw, read_inputs

    dev = resolve_device(device)
    model, meta = load_student(student, dev)
    names, raw = read_inputs(inputs, meta["input_shape"])
    probs = predict_raw(model, meta, raw, dev)
    confidence, classes = probs.max(1)
    for name, cls, p in zip(names, classes.tolist(), confidence.tolist()):
        if as_json:
            click.echo(json.dumps({"input": name, "class": cls, "probability": round(p, 6)}))
        else:
            click.echo(f"{name}\t{cls}\t{p:.4f}")


if __name__ == "__main__":
    run_standalone(main)
