"""`fmnist-accel export` and `predict --onnx`: every model through torch's ONNX exporter and
onnxruntime, checked against PyTorch; the file's metadata; TTA as `eval --tta`; checkpoints of
1 and 2 processes; an existing file replaced whole. (Bad input: tests/test_bad_input.py, the
cases of docs/bad-input.md.)

Checkpoints are small: randomly initialised models saved by the toolkit's own checkpoint
writer, with BatchNorm statistics and airbench's whitening filters set as training would set
them, or tiny trainings on generated data (support/fakedata.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from support.errors import assert_one_line_error
from support.fakedata import N_TEST, N_TRAIN, write_fashion_dir
from support.files import file_digests
from support.processes import CLI, process_env, run_command, train, why

from fmnist_accel.commands.export import (
    LOGIT_TOLERANCE,
    export_checkpoint,
    onnx_metadata,
)
from fmnist_accel.commands.onnx_model import FORMAT, INPUT_NAME, open_onnx_model
from fmnist_accel.config import TrainConfig
from fmnist_accel.engine.data import CLASS_NAMES, MEAN, STD, load_split
from fmnist_accel.engine.device_data import normalise
from fmnist_accel.engine.models import MODELS, build_model
from fmnist_accel.engine.trained_model import model_from_checkpoint
from fmnist_accel.run.outputs import checkpoint_metadata
from fmnist_accel.store.checkpoint import load_model_checkpoint, save_model_checkpoint

# export's line: "FILE: 0.45 MB (mlp, epoch 2), onnxruntime test accuracy 0.9100 on 100
# images, largest logit difference 9.5e-07 over ... (tolerance 5.4e-04); predicted classes
# identical to PyTorch's"
PARITY_LINE = re.compile(
    r"^(?P<file>.+): (?P<mb>\d+\.\d\d) MB \((?P<model>[a-z0-9-]+), epoch (?P<epoch>\d+)\), "
    r"onnxruntime test accuracy (?P<accuracy>\d\.\d{4}) on (?P<n>[\d,]+) images, largest logit "
    r"difference (?P<diff>\S+) over the test and \d+ random images \(tolerance (?P<tol>\S+)\); "
    r"predicted classes identical to PyTorch's$"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("data"), N_TRAIN, N_TEST)


def trained_looking_checkpoint(name: str, data_dir: Path, path: Path, seed: int = 0) -> Path:
    """A randomly initialised `name` whose BatchNorm statistics and scales are far from their
    initial 0 and 1 (a folding or eval-mode mistake shows), airbench's whitening fitted to the
    training images as its session fits it; saved with the metadata a run saves."""
    torch.manual_seed(seed)
    model = build_model(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                module.bias.copy_(torch.randn(n, generator=g) * 0.1)
                if module.weight.requires_grad:
                    module.weight.copy_(torch.rand(n, generator=g) + 0.5)
        if hasattr(model, "fit_whitening"):
            model.fit_whitening(normalise(load_split(data_dir, "train").images))
    config = TrainConfig(model=name, data_dir=str(data_dir))
    record = {"epoch": 3, "train_loss": 0.61, "valid_loss": 0.52, "valid_accuracy": 0.81}
    n_params = sum(p.numel() for p in model.parameters())
    save_model_checkpoint(path, model.state_dict(), checkpoint_metadata(config, record, n_params))
    return path


def by_hand(model: torch.nn.Module, images: torch.Tensor, tta: bool | str = False) -> np.ndarray:
    """The logits as training's normalisation and eval's TTA define them, written out here:
    tta True or "flip", or "flip+shift" (the shifts made on the uint8 images, black coming
    in, before normalising)."""
    raw = images.reshape(-1, 1, 28, 28).float()

    def logits_of(pixels):
        x = (pixels - 255 * MEAN) / (255 * STD)
        return (model(x) + model(x.flip(-1))) / 2 if tta else model(x)

    with torch.no_grad():
        logits = logits_of(raw)
        if tta == "flip+shift":
            down_right = torch.zeros_like(raw)
            down_right[..., 1:, 1:] = raw[..., :-1, :-1]
            up_left = torch.zeros_like(raw)
            up_left[..., :-1, :-1] = raw[..., 1:, 1:]
            logits = logits / 2 + (logits_of(down_right) + logits_of(up_left)) / 4
    return logits.double().numpy()


def cli(*args, cwd: Path) -> object:
    return run_command([CLI, *args], cwd=cwd)


# ------------------------------------------------------------------------------------------
# Every model
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_exports_and_passes_the_parity_check(name, data_dir, tmp_path):
    """Export in eval mode (BatchNorm's running statistics, no dropout, the frozen whitening
    layer), any batch size, within the tolerance of PyTorch on test and random images."""
    path = trained_looking_checkpoint(name, data_dir, tmp_path / "best.safetensors")
    model, meta = model_from_checkpoint(path)
    test = load_split(data_dir, "test")
    output = tmp_path / f"{name}.onnx"
    check = export_checkpoint(model, meta, path, output, test, tta=False)
    assert check.test_images == N_TEST
    assert check.max_difference <= check.tolerance
    assert check.classes_differ == 0 and check.ort_accuracy == check.torch_accuracy

    # Independently of export's own check: the file, in a new session, against the model
    # fed by hand; batches of 1, 7 and all.
    classifier = open_onnx_model(str(output))
    expected = by_hand(model, test.images)
    tolerance = LOGIT_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    for batch in (1, 7, N_TEST):
        got = classifier.logits(test.images[:, None].numpy(), batch_size=batch)
        assert got.shape == (N_TEST, 10) and got.dtype == np.float32
        assert np.abs(got - expected).max() <= tolerance, batch
        assert (got.argmax(1) == expected.argmax(1)).all()
    # the graph itself takes N x 1 x 28 x 28 uint8, with a named dynamic batch dimension
    (given,) = onnx.load(output).graph.input
    assert given.name == INPUT_NAME and given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = given.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_a_shift_trained_model_exports_eval_tta_with_its_shifts(data_dir, tmp_path):
    """A checkpoint trained with random shifts: export --tta's graph averages the mirror and
    the one-pixel shifts, as eval --tta does for it; its metadata says so."""
    path = trained_looking_checkpoint("airbench-s", data_dir, tmp_path / "best.safetensors")
    model, meta = model_from_checkpoint(path)
    meta["config"] |= {"augment": True, "crop_padding": 1}
    test = load_split(data_dir, "test")
    output = tmp_path / "model.onnx"
    check = export_checkpoint(model, meta, path, output, test, tta="flip+shift")
    assert check.max_difference <= check.tolerance and check.classes_differ == 0
    expected = by_hand(model, test.images, tta="flip+shift")
    got = open_onnx_model(str(output)).logits(test.images.numpy())
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE * max(1, np.abs(expected).max())
    flip_only = by_hand(model, test.images, tta="flip")
    assert np.abs(got - flip_only).max() > 1e-3  # the shifts do count
    proto = onnx.load(output)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["tta"] == "true" and "shifted one pixel" in props["output"]
    assert "flip+shift TTA" in proto.doc_string


def test_an_existing_file_is_replaced_whole(data_dir, tmp_path):
    """The new file is renamed over the old one (store/atomic.py): a hard link to the old file
    still holds the old bytes, the new file is complete, no temporary file is left."""
    path = trained_looking_checkpoint("mlp", data_dir, tmp_path / "best.safetensors")
    model, meta = model_from_checkpoint(path)
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the old file")
    os.link(output, tmp_path / "link")
    export_checkpoint(model, meta, path, output, load_split(data_dir, "test"), tta=False)
    assert (tmp_path / "link").read_bytes() == b"the old file"
    onnx.checker.check_model(onnx.load(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "link", "model.onnx"]


@pytest.mark.slow
def test_the_same_checkpoint_exports_the_same_bytes(data_dir, tmp_path):
    path = trained_looking_checkpoint("cnn-bn", data_dir, tmp_path / "best.safetensors")
    model, meta = model_from_checkpoint(path)
    test = load_split(data_dir, "test")
    for name in ("a.onnx", "b.onnx"):
        export_checkpoint(model, meta, path, tmp_path / name, test, tta=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# ------------------------------------------------------------------------------------------
# The command, on the session's tiny run
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> dict:
    """`fmnist-accel export best` of the tiny run, without and with --tta."""
    folder = tmp_path_factory.mktemp("exported")
    results = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        output = folder / f"{name}.onnx"
        res = cli("export", "best", "--run-dir", tiny_run.run_dir, "--output", output, *extra,
                  cwd=folder)  # fmt: skip
        assert res.rc == 0, str(res)
        results[name] = (output, res)
    return results


def eval_json(tiny_run, *extra: str, cwd: Path) -> dict:
    res = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--json", *extra, cwd=cwd)
    assert res.rc == 0, str(res)
    return res.json()


@pytest.mark.slow
def test_export_prints_one_line_and_the_accuracy_of_eval(exported, tiny_run, tmp_path):
    output, res = exported["plain"]
    assert res.stderr == "", str(res)
    (line,) = res.stdout.splitlines()
    match = PARITY_LINE.match(line)
    assert match, line
    assert match["file"] == str(output)
    assert float(match["mb"]) == pytest.approx(output.stat().st_size / 1e6, abs=0.006)
    assert match["model"] == "mlp" and int(match["n"].replace(",", "")) == N_TEST
    assert float(match["diff"]) <= float(match["tol"])
    assert float(match["accuracy"]) == pytest.approx(eval_json(tiny_run, cwd=tmp_path)["accuracy"])
    assert tiny_run.digests == file_digests(tiny_run.run_dir)  # the run is only read


@pytest.mark.slow
def test_metadata_is_read_back(exported, tiny_run):
    """The class names, the model, the checkpoint's epoch and metrics, the toolkit's version,
    through onnx and through onnxruntime alike."""
    output, _ = exported["plain"]
    _, meta = load_model_checkpoint(tiny_run.run_dir / "best.safetensors", metadata_only=True)
    props = {p.key: p.value for p in onnx.load(output).metadata_props}
    assert props["format"] == FORMAT
    assert json.loads(props["classes"]) == list(CLASS_NAMES)
    assert props["model"] == "mlp"
    assert int(props["epoch"]) == meta["epoch"]
    assert json.loads(props["metrics"]) == meta["metrics"]
    assert set(meta["metrics"]) >= {"valid_accuracy", "valid_loss", "train_loss"}
    assert props["toolkit_version"] == version("fmnist-accel")
    assert props["tta"] == "false"
    assert props["checkpoint"] == "tiny/best.safetensors"
    assert json.loads(props["normalisation"]) == {"mean": 72.93, "std": 90.015}
    assert props == onnx_metadata(meta, tiny_run.run_dir / "best.safetensors", tta=False)
    assert open_onnx_model(str(output)).metadata == props
    tta_props = {p.key: p.value for p in onnx.load(exported["tta"][0]).metadata_props}
    assert tta_props["tta"] == "true" and "mirror" in tta_props["output"]


@pytest.mark.slow
def test_tta_export_matches_eval_tta(exported, tiny_run, tmp_path):
    """--tta puts eval --tta's mean of each image's and its mirror's logits into the graph:
    the same accuracy as `eval --tta`, the same logits as eval's TTA, and eval's warning for
    a model trained without flips."""
    output, res = exported["tta"]
    (line,) = res.stdout.splitlines()
    match = PARITY_LINE.match(line)
    assert match, line
    with_tta = eval_json(tiny_run, "--tta", cwd=tmp_path)
    assert float(match["accuracy"]) == pytest.approx(with_tta["accuracy"])
    (warning,) = res.stderr.splitlines()
    assert warning.startswith("fmnist-accel: warning: ") and "trained without flipped" in warning

    model, _ = model_from_checkpoint(tiny_run.run_dir / "best.safetensors")
    images = load_split(tiny_run.data_dir, "test", allow_download=False).images
    expected = by_hand(model, images, tta=True)
    got = open_onnx_model(str(output)).logits(images.numpy())  # N x 28 x 28: the axis added
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE * max(1, np.abs(expected).max())
    plain = open_onnx_model(str(exported["plain"][0])).logits(images.numpy())
    assert np.abs(plain - got).max() > 1e-3  # the mirror images do count


@pytest.mark.slow
def test_predict_onnx_gives_what_predict_gives(exported, tiny_run, tmp_path):
    """The same lines for a test image and for a picture file (the same picture preparation),
    the same JSON but for the file named, and the same picture saved."""
    output, _ = exported["plain"]
    data = ["--data-dir", tiny_run.data_dir]
    checkpoint = ["best", "--run-dir", tiny_run.run_dir]
    ours = cli("predict", "--onnx", output, "--index", "10", *data, cwd=tmp_path)
    theirs = cli("predict", *checkpoint, "--index", "10", cwd=tmp_path)
    assert ours.rc == theirs.rc == 0, f"{ours}\n{theirs}"
    assert ours.stdout == theirs.stdout and ours.stderr == theirs.stderr == ""
    assert ours.stdout.startswith("test image 10: ")
    picture = tmp_path / "photo.png"
    g = np.random.default_rng(0)
    pixels = np.full((60, 40), 250, np.uint8)
    pixels[10:50, 8:32] = g.integers(0, 120, (40, 24))  # a dark item on white paper
    Image.fromarray(pixels).save(picture)
    ours = cli("predict", "--onnx", output, "--image", picture, "--json", "--top", "10",
               "--save", tmp_path / "a.png", cwd=tmp_path)  # fmt: skip
    theirs = cli("predict", *checkpoint, "--image", picture, "--json", "--top", "10",
                 "--save", tmp_path / "b.png", cwd=tmp_path)  # fmt: skip
    assert ours.rc == theirs.rc == 0, f"{ours}\n{theirs}"
    a, b = ours.json(), theirs.json()
    assert a.pop("checkpoint") == str(output)
    assert b.pop("checkpoint") == str(tiny_run.run_dir / "best.safetensors")
    assert a.pop("figure") == str(tmp_path / "a.png") and b.pop("figure")
    assert a["predicted_class"] == b["predicted_class"]
    for x, y in zip(a.pop("top"), b.pop("top"), strict=True):
        assert x["class"] == y["class"] and x["probability"] == pytest.approx(y["probability"])
    assert a.pop("probability") == pytest.approx(b.pop("probability"))
    assert a == b
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# ------------------------------------------------------------------------------------------
# Real trainings: an EMA airbench, and a run on 2 processes against one on 1
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ema_airbench_checkpoint_exports(data_dir, tmp_path):
    """A real airbench-s run (its whitening layer fitted by the session) saving its weight
    average (--ema-decay): exported, checked, and onnxruntime's accuracy is that of the run's
    final test (the evaluation `eval` runs)."""
    args = ["--model", "airbench-s", "--epochs", "1", "--batch-size", "50",
            "--ema-decay", "0.9", "--data-dir", str(data_dir), "--output-dir", str(tmp_path),
            "--run-name", "ema"]  # fmt: skip
    proc = train(1, args)
    assert proc.returncode == 0, why(proc)
    run = tmp_path / "ema"
    check = export_in_process(run / "best.safetensors", tmp_path / "ema.onnx")
    assert check.max_difference <= check.tolerance and check.classes_differ == 0
    final_test = json.loads((run / "summary.json").read_text())["final_test"]
    assert final_test["num_samples"] == check.test_images
    assert check.ort_accuracy == pytest.approx(final_test["accuracy"])
    _, meta = load_model_checkpoint(run / "best.safetensors", metadata_only=True)
    assert meta["config"]["ema_decay"] == 0.9 and meta["config"]["model"] == "airbench-s"


def export_in_process(path: Path, output: Path):
    """export_checkpoint of a checkpoint file, on the test split its run trained with."""
    model, meta = model_from_checkpoint(path)
    test = load_split(meta["config"]["data_dir"], "test", allow_download=False)
    return export_checkpoint(model, meta, path, output, test, tta=False)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def graph_without_weights_and_metadata(path: Path) -> bytes:
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    del model.metadata_props[:]
    model.ClearField("doc_string")
    return model.SerializeToString()


@pytest.mark.slow
def test_checkpoints_of_1_and_2_processes_export_the_same_graph_and_weights(data_dir, tmp_path):
    """The same training on 2 processes (batch 25 each) and on 1 (batch 50). A run on 2
    processes does not train bit for bit as one on 1 (here the weights differ by about 1e-3
    after an epoch), so the two files cannot be equal byte for byte; what is tested is that
    export adds nothing of the processes: the two files have the same graph node for node,
    each holds its own checkpoint's weights exactly (the MLP's weights are initializers as
    they are, or transposed), and the files differ by no more than their checkpoints do."""
    common = ["--model", "mlp", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.01",
              "--data-dir", str(data_dir), "--output-dir", str(tmp_path)]  # fmt: skip
    for nproc, batch in ((1, "50"), (2, "25")):
        proc = train(nproc, [*common, "--batch-size", batch, "--run-name", f"p{nproc}"])
        assert proc.returncode == 0, why(proc)
    files = {}
    for nproc in (1, 2):
        run = tmp_path / f"p{nproc}"
        files[nproc] = tmp_path / f"p{nproc}.onnx"
        check = export_in_process(run / "last.safetensors", files[nproc])
        assert check.max_difference <= check.tolerance
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert summary["world_size"] == 2

    assert graph_without_weights_and_metadata(files[1]) == graph_without_weights_and_metadata(
        files[2]
    )
    weights = {n: load_model_checkpoint(tmp_path / f"p{n}" / "last.safetensors")[0] for n in (1, 2)}
    exported = {n: initializers(files[n]) for n in (1, 2)}
    assert exported[1].keys() == exported[2].keys()
    for n in (1, 2):
        held = list(exported[n].values())
        for key, tensor in weights[n].items():
            w = tensor.numpy()
            assert any(
                np.array_equal(w, x) or (w.ndim == 2 and np.array_equal(w.T, x)) for x in held
            ), f"{key} of p{n} is not in its ONNX file as it is"
    checkpoint_gap = max(float((weights[1][k] - weights[2][k]).abs().max()) for k in weights[1])
    onnx_gap = max(float(np.abs(exported[1][k] - exported[2][k]).max()) for k in exported[1])
    assert 0 < onnx_gap <= checkpoint_gap


# ------------------------------------------------------------------------------------------
# Bad input (docs/bad-input.md names these test_bad_input_* tests; tests/test_bad_input.py
# checks that every one has its row)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def ws(tiny_run, tmp_path) -> Path:
    """tmp_path with a copy of the session's tiny run in runs/existing."""
    shutil.copytree(tiny_run.run_dir, tmp_path / "runs" / "existing")
    return tmp_path


def export_cli(ws: Path, *args, checkpoint: str = "best", **kwargs):
    return run_command(
        [CLI, "export", checkpoint, "--run-dir", ws / "runs" / "existing", *args], ws, **kwargs
    )


def test_bad_input_export_of_a_damaged_checkpoint(ws):
    best = ws / "runs" / "existing" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:-1000])
    before = file_digests(ws)
    res = export_cli(ws, "--output", ws / "model.onnx")
    assert_one_line_error(res, f"{best} is not a readable checkpoint")
    assert file_digests(ws) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, unmounted afterwards (root only: CI runs the tests as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(*options: str) -> None:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(["size=2m", *options]), "tmpfs", str(disk)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    try:
        yield disk, mount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


@pytest.mark.parametrize(
    "where", ["missing-folder", "under-a-file", "a-folder", "the-checkpoint", "read-only"]
)
def test_bad_input_export_output_where_no_file_can_be(ws, where, request):
    """--output in a folder that does not exist, under a regular file, naming a folder or the
    checkpoint itself, or in a read-only folder: one line before any work, nothing written."""
    if where == "missing-folder":
        output, expected = ws / "missing" / "m.onnx", f"the folder {ws / 'missing'} does not exist"
    elif where == "under-a-file":
        (ws / "notadir").write_text("a file")
        output, expected = ws / "notadir" / "m.onnx", f"{ws / 'notadir'} is not a folder"
    elif where == "a-folder":
        (ws / "folder.onnx").mkdir()
        output, expected = ws / "folder.onnx", f"--output {ws / 'folder.onnx'} is a folder"
    elif where == "the-checkpoint":
        output = ws / "runs" / "existing" / "best.safetensors"
        expected = f"--output {output} is the checkpoint itself: name a new .onnx file"
    elif os.geteuid() == 0:  # root writes into any folder whose mode says no: a read-only mount
        disk, mount = request.getfixturevalue("small_disk")
        mount("ro")
        output, expected = disk / "m.onnx", f"cannot write to the folder {disk} (Read-only file"
    else:
        (ws / "ro").mkdir(mode=0o555)
        output, expected = ws / "ro" / "m.onnx", "(Permission denied)"
    before = file_digests(ws)
    res = export_cli(ws, "--output", output)
    assert_one_line_error(res, expected)
    assert file_digests(ws) == before


def test_bad_input_export_onto_a_full_disk(ws, small_disk):
    """The file does not fit (the folder takes a probe file, the 0.45 MB model does not):
    exit 74, one line with the free space; the old file there is intact, no temporary file."""
    disk, mount = small_disk
    mount()
    old = disk / "model.onnx"
    old.write_bytes(b"the old model")
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 100_000))
    res = export_cli(ws, "--output", old)
    assert_one_line_error(
        res, f"cannot write {old}: No space left on device (", "kB free there)", rc=74
    )
    assert old.read_bytes() == b"the old model"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "model.onnx"]


# Put in from outside, as tests/support/harness.py puts faults into training: the exported
# graph is built, then the PyTorch model it is checked against gets one bias 0.5 higher
# (what an exporter that dropped or changed a layer would give).
WRONG_GRAPH = """
import sys, torch
import fmnist_accel.commands.export as export
from fmnist_accel.cli import main
real = export.build_onnx
def exported_then_changed(deployed, opset):
    proto = real(deployed, opset)
    with torch.no_grad():
        deployed.model.net[5].bias[3] += 0.5
    return proto
export.build_onnx = exported_then_changed
sys.argv[0] = "fmnist-accel"
main()
"""


def test_bad_input_export_whose_check_fails(ws):
    """A mismatch beyond the tolerance is an error, not a warning: one line, exit 2, and the
    existing --output file is left as it was (the file is checked before it is renamed)."""
    output = ws / "model.onnx"
    output.write_bytes(b"the old model")
    before = file_digests(ws)
    res = run_command(
        [sys.executable, "-c", WRONG_GRAPH, "export", "best", "--run-dir",
         ws / "runs" / "existing", "--output", output],
        ws,
    )  # fmt: skip
    line = assert_one_line_error(
        res, "the exported model's logits differ from PyTorch's by up to 0.5 on "
    )
    assert f"beyond the tolerance {LOGIT_TOLERANCE:g}" not in line  # scaled to the logits
    assert f"nothing written to {output} (an older file there is unchanged)" in line
    assert file_digests(ws) == before


def test_bad_input_export_at_an_opset_the_exporter_cannot_write(ws):
    before = file_digests(ws)
    res = export_cli(ws, "--output", ws / "m.onnx", "--opset", "99")
    latest = onnx.defs.onnx_opset_version()
    assert_one_line_error(
        res,
        f"--opset 99: onnx {onnx.__version__} knows opsets up to {latest}; choose an --opset "
        f"from 18 to {latest}",
    )
    assert file_digests(ws) == before


@pytest.mark.parametrize("command", ["export", "predict-onnx"])
def test_bad_input_export_without_the_extra(ws, exported, command):
    """A module of the extra missing (hidden here by one that cannot be imported): export
    (onnxscript) and predict --onnx (onnxruntime) name the extra to install."""
    missing = "onnxscript" if command == "export" else "onnxruntime"
    hidden = ws / "hidden"
    hidden.mkdir()
    (hidden / f"{missing}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{missing}'\", name='{missing}')\n"
    )
    env = process_env(PYTHONPATH=str(hidden))
    before = file_digests(ws)
    if command == "export":
        res = export_cli(ws, "--output", ws / "m.onnx", env=env)
        expected = "export needs onnx, onnxscript, onnxruntime; not installed: onnxscript: "
    else:
        args = ["predict", "--onnx", exported["plain"][0], "--index", "0"]
        res = run_command([CLI, *args], ws, env=env)
        expected = "this needs onnxruntime, which is not installed: "
    assert_one_line_error(res, expected + "pip install 'fmnist-accel[export]'")
    assert file_digests(ws) == before


@pytest.mark.parametrize("kind", ["text", "checkpoint", "foreign-onnx", "missing", "folder"])
def test_bad_input_predict_onnx_with_a_file_that_is_not_an_export(ws, kind):
    path = ws / "model.onnx"
    if kind == "text":
        path.write_text("not a model\n")
        expected = f"{path} is not an ONNX model onnxruntime can load (Protobuf parsing failed"
    elif kind == "checkpoint":
        path = ws / "runs" / "existing" / "best.safetensors"
        expected = f"{path} is not an ONNX model onnxruntime can load ("
    elif kind == "foreign-onnx":
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
        expected = f"{path} is an ONNX model but not one that fmnist-accel export wrote"
    elif kind == "missing":
        expected = f"no ONNX model at {path}"
    else:
        path.mkdir()
        expected = f"{path} is a folder: give the .onnx file that export wrote"
    before = file_digests(ws)
    res = run_command([CLI, "predict", "--onnx", path, "--index", "0"], ws)
    assert_one_line_error(res, expected)
    assert file_digests(ws) == before


def test_bad_input_predict_onnx_with_a_checkpoint_too(ws, exported):
    output, _ = exported["plain"]
    res = run_command([CLI, "predict", "last", "--onnx", output, "--index", "0"], ws)
    assert_one_line_error(
        res, "--onnx classifies with the ONNX file alone: leave out the checkpoint last"
    )
