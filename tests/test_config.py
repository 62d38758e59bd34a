"""The training options (config.py): how they are resolved, and the notes and refusals that
involve more than one option."""

from __future__ import annotations

from fmnist_accel.config import resolve_config, unused_options


def test_options_that_have_no_effect_are_named():
    explicit = {"momentum": 0.8, "plateau_patience": 3, "lr": 0.01}
    assert unused_options(explicit, resolve_config(explicit)) == ["momentum"]
    explicit = {"optimizer": "sgd", "momentum": 0.8, "scheduler": "cosine", "plateau_factor": 0.5}
    assert unused_options(explicit, resolve_config(explicit)) == ["plateau_factor"]
    explicit = {"crop_padding": 1}  # the default recipe does not augment
    assert unused_options(explicit, resolve_config(explicit)) == ["crop_padding"]
    explicit = {"recipe": "accurate", "crop_padding": 1}  # it does: flips, now with shifts
    assert unused_options(explicit, resolve_config(explicit)) == []
    explicit = {"alternating_flips": True}  # no flips to alternate
    assert unused_options(explicit, resolve_config(explicit)) == ["alternating_flips"]
    explicit = {"recipe": "accurate-long", "alternating_flips": True}
    assert unused_options(explicit, resolve_config(explicit)) == []
