"""`eval --tta` on a model that never trained on mirror images warns, once, on stderr."""

from __future__ import annotations

from fmnist_accel.checkpoint import load_model_checkpoint, save_model_checkpoint
from fmnist_accel.evaluate import TTA_COST


def stderr_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def test_tta_on_a_run_trained_without_flips_warns_why_and_what_it_costs(tiny_run, cli):
    best = tiny_run.run_dir / "best.safetensors"
    assert load_model_checkpoint(best)[1]["config"]["augment"] is False
    res = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--tta", "--json")
    assert res.rc == 0, str(res)
    assert res.json()["tta"] is True  # stdout stays one JSON object
    [line] = stderr_lines(res)
    assert line.startswith(f"fmnist-accel: warning: {best} was trained without flipped images")
    assert TTA_COST in line and "mlp 0.9016 -> 0.8571" in line
    # Without --tta, nothing to warn about.
    plain = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--json")
    assert plain.rc == 0 and stderr_lines(plain) == [], str(plain)


def test_tta_on_a_run_trained_with_flips_is_quiet(tiny_run, cli, tmp_path):
    """The same weights, saved as a run with --augment would save them."""
    state, meta = load_model_checkpoint(tiny_run.run_dir / "best.safetensors")
    meta["config"]["augment"] = True
    flipped = tmp_path / "augmented.safetensors"
    save_model_checkpoint(flipped, state, {k: v for k, v in meta.items() if k != "format"})
    res = cli("eval", flipped, "--tta", "--data-dir", tiny_run.data_dir, "--json")
    assert res.rc == 0, str(res)
    assert res.json()["tta"] is True and stderr_lines(res) == []
