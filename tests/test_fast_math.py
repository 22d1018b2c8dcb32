"""Fast math where it is safe: autocast, GradScaler, channels_last, torch.compile, neuron backends.

On CPU every default resolves to what bkd always did (float32, contiguous, eager, spikingjelly's
torch reference neurons), and the real extraction and training paths stay bit for bit the same;
the reduced precisions run on CPU too (bfloat16 and float16 autocast), so their plumbing, manifest
record, GradScaler checkpointing and refusals are tested here. torch.compile is tested with the
`aot_eager` backend (dynamo's graph capture, torch's own kernels): inductor works on this 2-core machine
and gives the same outputs (within 2e-7, gradients 6e-7), but compiling took 17 s for a five-layer model
and minutes for the ResNet-10 teacher and the tiny student below, too slow for the suite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline import checkpoint
from pipeline.config import ExtractConfig, StudentConfig, load_config
from pipeline.data import load_split
from pipeline.errors import ConfigError
from pipeline.student.losses import DistillationLoss
from pipeline.student.models import create_student
from pipeline.teacher.models import create_teacher, load_teacher, teacher_outputs
from pipeline import precision
from pipeline.student import fast
from pipeline.teacher import fast as teacher_fast
from pipeline.student.fast import FastStudent, check_neuron_backend, prepare_student
from pipeline.teacher.fast import prepare_teacher
from pipeline.precision import resolve_channels_last, resolve_precision
from pipeline.samplers import ChunkShuffleSampler
from pipeline.student.train import StudentForward
from pipeline.engine import Trainer, make_optimizer
from tests.helpers import REPO, assert_one_line, run_bkd

CPU = torch.device("cpu")
STORE = "cache/mnist5k-resnet18.zarr"
# 64 training and 64 test 8x8 digits (scikit-learn's: loaded in milliseconds), one shard of two chunks
# per split; a small student, one epoch
ARGS = ["--set", "data.name=digits", "--set", "data.limit=64", "--set", "extract.chunk_size=32",
        "--set", "extract.chunks_per_shard=2", "--set", "extract.features=[pre_logits]",
        "--set", "student.batch_size=32", "--set", "student.model_kwargs.widths=[4,8,8]",
        "--set", "student.timesteps=2"]


def _cfg(*overrides: str):
    return load_config(REPO / "params.yaml", [a for a in ARGS if a != "--set"] + list(overrides))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A working folder with a (random, untrained) teacher's weights and its default store."""
    root = tmp_path_factory.mktemp("fast")
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    cfg = _cfg()
    torch.manual_seed(0)
    teacher = create_teacher(cfg.teacher, 10, (1, 8, 8))
    checkpoint.save_weights(teacher.state_dict(), root / cfg.teacher.checkpoint)
    run_bkd(["extract-teacher", *ARGS], root)
    return root


def _arrays(store: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    return {f"{split}/{name}": root[f"{split}/{name}"][:] for split in ("train", "test")
            for name in ("features.pre_logits", "logits")}


def _manifest_precision(store: Path) -> str:
    return zarr.open_group(str(store), mode="r").attrs["manifest"]["teacher"]["precision"]


# --- defaults on CPU ------------------------------------------------------------------------------

def test_defaults_resolve_to_float32_contiguous_eager_torch_on_cpu():
    teacher = create_teacher(_cfg().teacher, 10, (1, 8, 8))
    assert resolve_precision(CPU, "auto") == "float32"
    assert resolve_channels_last(CPU, "auto", teacher) is False
    assert check_neuron_backend("auto", CPU, "float32") == "torch"
    prepared = prepare_teacher(teacher, CPU, ExtractConfig())
    assert (prepared.precision, prepared.channels_last, prepared.compile) == ("float32", False, False)
    assert prepared._outputs is teacher_outputs  # the very function extraction always called
    assert teacher.conv1.weight.is_contiguous()
    math = prepare_student(create_student("sew_resnet_mnist", 10, (1, 8, 8), 2), CPU, StudentConfig())
    assert (math.precision, math.compile, math.neuron_backend, math.grad_scaler()) == ("float32", False, "torch", None)


@pytest.mark.parametrize("capability,auto", [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 0), "float32")])
def test_auto_on_a_gpu_is_bfloat16_where_the_gpu_has_it(monkeypatch, capability, auto):
    """The GPU side of the resolution, with torch.cuda's answers stubbed (this machine has no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    gpu = torch.device("cuda:0")
    assert resolve_precision(gpu, "auto", "student.precision") == auto
    assert resolve_precision(gpu, "float16") == "float16"
    if auto == "float32":  # emulated bfloat16 is slower than float32: asking for it is refused
        with pytest.raises(ConfigError, match="student.precision: bfloat16 is not supported by a GPU"):
            resolve_precision(gpu, "bfloat16", "student.precision")
    assert resolve_channels_last(gpu, "auto", create_teacher(_cfg().teacher, 10, (1, 8, 8))) is True
    assert resolve_channels_last(gpu, "auto", nn.Linear(2, 2)) is False
    assert check_neuron_backend("auto", gpu, auto) == "auto"  # spikingjelly's own choice


def test_default_extraction_is_float32_and_bit_identical_to_the_plain_teacher(project):
    cfg = _cfg()
    assert _manifest_precision(project / STORE) == "float32"
    run_bkd(["extract-teacher", *ARGS, "--store", "cache/f32.zarr", "--set", "extract.precision=float32",
             "--set", "extract.channels_last=off"], project)
    ours, explicit = _arrays(project / STORE), _arrays(project / "cache/f32.zarr")
    for name in ours:
        np.testing.assert_array_equal(ours[name], explicit[name], err_msg=name)
    # and what the teacher gives outside the pipeline, in float32, stored as float16 (view 0 is the clean image)
    with contextlib.chdir(project):
        teacher = load_teacher(cfg.teacher, 10, (1, 8, 8))
    split = load_split(cfg.data, "train")
    features, logits = teacher_outputs(teacher, split.load(range(len(split))), ["pre_logits"])
    np.testing.assert_array_equal(ours["train/features.pre_logits"][:, 0],
                                  features["pre_logits"].numpy().astype(np.float16))
    np.testing.assert_array_equal(ours["train/logits"][:, 0], logits.numpy().astype(np.float16))


# --- bfloat16 extraction, and resuming at another precision ---------------------------------------

@pytest.fixture(scope="module")
def bf16_store(project) -> Path:
    run_bkd(["extract-teacher", *ARGS, "--store", "cache/bf16.zarr", "--set", "extract.precision=bfloat16"], project)
    return project / "cache/bf16.zarr"


def test_bfloat16_extraction_is_close_and_recorded_and_other_precision_resume_refused(project, bf16_store):
    store = bf16_store
    assert _manifest_precision(store) == "bfloat16"
    ours, reference = _arrays(store), _arrays(project / STORE)
    for name in ours:
        assert np.isfinite(ours[name]).all()
        scale = np.abs(reference[name].astype(np.float32)).max()
        np.testing.assert_allclose(ours[name].astype(np.float32), reference[name].astype(np.float32),
                                   atol=0.05 * scale, err_msg=name)
    assert any(not np.array_equal(ours[n], reference[n]) for n in ours)  # it did run in bfloat16
    # a store made at another precision is another run's: resuming into it is refused, naming the field
    proc = run_bkd(["extract-teacher", *ARGS, "--store", "cache/bf16.zarr", "--set", "extract.precision=float32"],
                   project, check=False)
    assert_one_line(proc.returncode, proc.stderr, "teacher.precision", "'bfloat16' in the store", "'float32' here",
                    "--overwrite")


# --- the student ----------------------------------------------------------------------------------

def test_default_student_run_is_bit_identical_to_explicit_float32(project):
    run_bkd(["train-student", *ARGS, "--epochs", "1", "--run-dir", "runs/default"], project)
    run_bkd(["train-student", *ARGS, "--epochs", "1", "--run-dir", "runs/f32", "--set", "student.precision=float32",
             "--set", "student.neuron_backend=torch"], project)
    a = checkpoint.load_weights(project / "runs/default/student.safetensors")
    b = checkpoint.load_weights(project / "runs/f32/student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_student_run_trains_from_a_bfloat16_store(project, bf16_store):
    """teacher.precision tells how targets were made; a student does not have to agree with it."""
    from pipeline.targets.spec import STUDENT_IDENTITY

    assert "teacher.precision" not in STUDENT_IDENTITY and "teacher" not in STUDENT_IDENTITY
    out = run_bkd(["train-student", *ARGS, "--epochs", "1", "--run-dir", "runs/bf16",
                   "--set", "student.precision=bfloat16", "--set", "extract.store=cache/bf16.zarr"], project)
    assert "forward: bfloat16, eager, neurons: torch" in out.stdout + out.stderr
    history = (project / "runs/bf16/history.json").read_text()
    assert "train_bkd" in history and "train_wsld" in history
    assert (project / "runs/bf16/student.safetensors").is_file()


def _tiny_forward(precision: str, compile: bool = False) -> tuple[StudentForward, dict]:
    torch.manual_seed(0)
    scfg = StudentConfig(distill="mixed")
    student = create_student("sew_resnet_mnist", 10, (1, 8, 8), 2, widths=[4, 4, 8])
    criterion = DistillationLoss(scfg, [("pre_logits", "pre_logits", (8,), (16,))])
    math = FastStudent(CPU, precision, compile, "torch")
    batch = {"images": torch.rand(6, 1, 8, 8), "labels": torch.arange(6), "teacher_features":
             {"pre_logits": torch.randn(6, 16).half()}, "teacher_logits": torch.randn(6, 10).half()}
    return StudentForward(student, criterion, math), batch


def test_float32_student_forward_is_the_plain_forward_bit_for_bit():
    """StudentForward with the resolved CPU default computes exactly what it computed without it."""
    (plain, batch), (ours, _) = _tiny_forward("float32"), _tiny_forward("float32")
    plain.fast = None  # the code path before fast math
    args = (batch["images"], batch["labels"], batch["teacher_features"], batch["teacher_logits"])
    results = []
    for model in (plain, ours):
        torch.manual_seed(1)  # the same blur mask
        terms, logits = model(*args)
        terms["loss"].backward()
        results.append((terms, logits, [p.grad for p in model.parameters()]))
    (t0, z0, g0), (t1, z1, g1) = results
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0) and torch.equal(z0, z1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1) if a is not None)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_student_forward_runs_in_autocast_and_the_loss_terms_in_float32(precision):
    forward, batch = _tiny_forward(precision)
    seen = {}
    forward.student.stem[0].register_forward_hook(lambda m, i, o: seen.update(stem=o.dtype))
    terms, logits = forward(batch["images"], batch["labels"], batch["teacher_features"], batch["teacher_logits"])
    assert seen["stem"] == getattr(torch, precision)  # the student's convolutions ran in the autocast dtype
    assert logits.dtype == torch.float32
    assert set(terms) == {"ce", "bkd", "wsld", "loss"} and all(t.dtype == torch.float32 for t in terms.values())
    terms["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in forward.parameters())


# --- checkpoint / resume under autocast, and the GradScaler ----------------------------------------

N, CHUNK, BATCH = 16, 4, 4  # 4 steps per epoch


class Crash(Exception):
    pass


def _trainer(run_dir, precision: str, fail_at: int | None = None, blow_up_at: int | None = None, epochs: int = 1):
    """A Trainer over a real (tiny) spiking student's forward in `precision`, as the student run builds it."""
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(N, 1, 8, 8), torch.randint(0, 3, (N,)))
    student = create_student("sew_resnet_mnist", 3, (1, 8, 8), 2, widths=[4, 4, 4])
    math = FastStudent(CPU, precision, False, "torch")
    sampler = ChunkShuffleSampler(N, CHUNK, 2, seed=1)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    optimizer, scheduler = make_optimizer(student.parameters(), 1e-2, 1e-4, epochs, len(loader))
    calls = {"n": 0}

    def step(batch):
        x, y = batch
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Crash
        _, logits = math.features(student, x, [])
        loss = nn.functional.cross_entropy(logits, y)
        if calls["n"] == blow_up_at:  # finite, but its scaled gradients overflow: GradScaler skips the step
            loss = loss * 1e35
        return {"loss": loss}, logits, y

    trainer = Trainer(modules={"student": student}, step=step, loader=loader, sampler=sampler, optimizer=optimizer,
                      scheduler=scheduler, epochs=epochs, run_dir=run_dir, evaluate=lambda: 0.5, device=CPU,
                      desc="test", checkpoint_every=2, scaler=math.grad_scaler())
    return trainer, student


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_crash_then_resume_under_autocast_equals_uninterrupted_run(tmp_path, precision):
    reference, ref_model = _trainer(tmp_path / "ref", precision, blow_up_at=2)
    reference.fit()
    if precision == "float16":  # the blown-up step was skipped, the scale backed off, the run went on
        assert reference.scaler.get_scale() <= 2.0**15
        assert checkpoint.load_state(tmp_path / "ref" / "last.pt")["scaler"]["scale"] == reference.scaler.get_scale()
    else:
        assert reference.scaler is None and "scaler" not in checkpoint.load_state(tmp_path / "ref" / "last.pt")

    crashed, _ = _trainer(tmp_path / "run", precision, fail_at=4, blow_up_at=2)  # at step 4, saved after step 2
    with pytest.raises(Crash):
        crashed.fit()
    state = checkpoint.load_state(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 2)
    resumed, model = _trainer(tmp_path / "run", precision)
    resumed.fit(resume=True)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    if precision == "float16":
        assert resumed.scaler.state_dict() == reference.scaler.state_dict()


def test_resuming_a_run_without_scaler_state_as_float16_is_refused(tmp_path):
    trainer, _ = _trainer(tmp_path, "float32")
    trainer.fit()
    again, _ = _trainer(tmp_path, "float16")
    with pytest.raises(Exception, match="GradScaler"):
        again.fit(resume=True)


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,fragments", [
    ("extract.precision=fp8", ("extract.precision", "auto, float32, bfloat16, float16", "fp8")),
    ("extract.channels_last=1", ("extract.channels_last", "expected str | bool")),
    ("extract.channels_last=yes please", ("extract.channels_last", "auto, on, off")),
    ("student.precision=half", ("student.precision", "half")),
    ("student.neuron_backend=cupy", ("student.neuron_backend", "cupy", "spikingjelly 2.0")),
])
def test_bad_values_are_one_line_refusals(tmp_path, override, fragments):
    proc = run_bkd(["evaluate", "--config", str(REPO / "params.yaml"), "--set", override,
                    "--run-dir", str(tmp_path / "none")], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, *fragments)


@pytest.mark.parametrize("backend,fragment", [("triton", "runs on CUDA only"), ("cuda", "not built")])
def test_a_neuron_backend_that_cannot_run_here_is_refused_before_training(project, backend, fragment):
    if backend == "cuda" and fast._native_built("lif"):
        pytest.skip("spikingjelly's native CUDA neurons are built here")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        fragment = "not installed"
    run_dir = project / f"runs/backend-{backend}"
    proc = run_bkd(["train-student", *ARGS, "--run-dir", str(run_dir), "--set", f"student.neuron_backend={backend}"],
                   project, check=False)
    assert_one_line(proc.returncode, proc.stderr, "student.neuron_backend", fragment)
    assert not (run_dir / "last.pt").exists()


def test_forced_neuron_backend_under_autocast_on_cuda_is_refused():
    """spikingjelly 2.0 runs its torch reference for a non-float32 membrane and refuses that when an
    implementation is forced; checked before any CUDA call, so it is testable here."""
    with pytest.raises(ConfigError, match="student.precision: float32"):
        check_neuron_backend("torch", torch.device("cuda"), "bfloat16")
    with pytest.raises(ConfigError, match="student.neuron_backend must be one of"):
        check_neuron_backend("cupy", CPU, "float32")


def test_forced_backends_know_which_neurons_they_can_run():
    from spikingjelly.activation_based import neuron, surrogate

    assert fast._node_ops(create_student("sew_resnet_mnist", 10, (1, 8, 8), 2)) == ({"lif"}, [])
    odd = nn.Sequential(neuron.LIFNode(surrogate_function=surrogate.PiecewiseLeakyReLU(), step_mode="m"),
                        neuron.IzhikevichNode(step_mode="m"))
    assert fast._node_ops(odd) == (set(), ["the PiecewiseLeakyReLU surrogate", "IzhikevichNode neurons"])


# --- channels_last and torch.compile --------------------------------------------------------------

@pytest.fixture(scope="module")
def conv_teacher():
    """timm's smallest ResNet (one block per stage): compiles in a few seconds."""
    torch.manual_seed(0)
    return _small_teacher(), torch.rand(5, 1, 16, 16)


def _small_teacher() -> nn.Module:
    torch.manual_seed(0)
    return create_teacher(_cfg("teacher.model=resnet10t", "teacher.small_input_stem=false").teacher, 10,
                          (1, 16, 16)).eval()


def test_channels_last_teacher_gives_the_same_outputs(conv_teacher):
    teacher, images = conv_teacher
    locations = ["pre_logits", "layer1", "layer2"]
    reference = teacher_outputs(teacher, images, locations)
    model = _small_teacher()
    prepared = prepare_teacher(model, CPU, ExtractConfig(channels_last="on"))
    assert prepared.channels_last and model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    features, logits = prepared.outputs(images, locations)
    torch.testing.assert_close(logits, reference[1], rtol=1e-4, atol=1e-5)
    for loc in locations:
        torch.testing.assert_close(features[loc], reference[0][loc], rtol=1e-4, atol=1e-5)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(precision, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    yield
    torch._dynamo.reset()


def test_compiled_teacher_gives_the_eager_outputs_and_keeps_its_hooks(conv_teacher, aot_eager):
    teacher, images = conv_teacher
    prepared = prepare_teacher(teacher, CPU, ExtractConfig(compile=True))
    assert prepared.compile and prepared._outputs is not teacher_outputs
    locations = ["pre_logits", "layer1", "map"]  # a module capture inside the compiled code
    for batch in (images, images.flip(0)):  # the second call's captures are its own, not the first's
        ours, reference = prepared.outputs(batch, locations), teacher_outputs(teacher, batch, locations)
        torch.testing.assert_close(ours[1], reference[1])
        assert ours[0].keys() == reference[0].keys()
        for loc in locations:
            torch.testing.assert_close(ours[0][loc], reference[0][loc])
    assert not any(m._forward_hooks for m in teacher.modules())  # no capture hook left behind


def test_compiled_student_step_gives_the_eager_loss_and_gradients(aot_eager):
    (eager, batch), (compiled, _) = _tiny_forward("float32"), _tiny_forward("float32", compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # weights files keep their names
    args = (batch["images"], batch["labels"], batch["teacher_features"], batch["teacher_logits"])
    mask = torch.ones(6, 16)  # the same blur on both (the heads draw it from the global RNG)
    for model in (eager, compiled):
        model.criterion.feature_terms[0].blur_mask = lambda aligned: mask
        terms, _ = model(*args)
        terms["loss"].backward()
        model.result = terms
    torch.testing.assert_close(compiled.result["loss"], eager.result["loss"])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.fixture
def compile_spy(monkeypatch):
    """torch.compile replaced by a recorder that returns the eager function: the plumbing, without compiling."""
    wrapped = []

    def spy(fn):
        def call(*args, **kwargs):
            wrapped.append(fn.__name__)
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(fast, "compiled", spy)  # the student's
    monkeypatch.setattr(teacher_fast, "compiled", spy)
    return wrapped


def test_extract_and_student_compile_reach_the_forwards(project, compile_spy):
    run_bkd(["extract-teacher", *ARGS, "--store", "cache/compiled.zarr", "--set", "extract.compile=true",
             "--set", "extract.splits=[train]"], project)
    assert compile_spy and set(compile_spy) == {"teacher_outputs"}
    compile_spy.clear()
    run_bkd(["train-student", *ARGS, "--epochs", "1", "--run-dir", "runs/compiled", "--set", "student.compile=true"],
            project)
    assert len(compile_spy) == 2 and set(compile_spy) == {"spiking_outputs"}  # one per training step
    weights = checkpoint.load_weights(project / "runs/compiled/student.safetensors")
    student = create_student("sew_resnet_mnist", 10, (1, 8, 8), 2, widths=[4, 8, 8])
    assert weights.keys() == student.state_dict().keys()  # the weights file keeps the module's key names


def test_channels_last_takes_yaml_booleans_as_on_and_off():
    assert _cfg("extract.channels_last=on").extract.channels_last == "on"  # YAML 1.1 read True
    assert _cfg("extract.channels_last=off").extract.channels_last == "off"
    assert _cfg('extract.channels_last="off"').extract.channels_last == "off"
    assert _cfg("extract.channels_last=auto").extract.channels_last == "auto"
