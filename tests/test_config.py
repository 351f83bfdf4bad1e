import subprocess
import sys

import pytest

from selfsup.methods import METHODS
from selfsup.platform.config import ConfigError, load_config, shipped_configs, to_yaml


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(name)
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(str(p)) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr' (allowed: betas, clip_grad,"),
    ("method.temperatur=0.1", "unknown key 'method.temperatur' (allowed: proj_dim, proj_hidden_dim, temperature)"),
    ("data.views.view0.sise=3", "unknown key 'data.views.view0.sise' (allowed: blur_p,"),
    ("optim.lr=fast", "optim.lr: Input should be a valid number"),
    ("optim.name=rmsprop", "optim.name: Input should be 'adamw', 'sgd' or 'lars'"),
    ("method.temperature=-1", "method.temperature: Input should be greater than 0"),
    ("method.name=foo", f"method.name 'foo' is not one of {', '.join(sorted(METHODS))}"),
    ("data.views.kind=multi_crop", "unknown key 'data.views.view0'"),
    ("data.batch_size=255", "data.batch_size 255 is not divisible by scaling.num_workers 2"),
    ("nonsense", "override 'nonsense' is not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("simclr_resnet18", [override])
    assert message in str(e.value)


def test_a_new_length_replaces_the_files():
    cfg = load_config("simclr_resnet18", ["schedule.steps=10"])
    assert cfg.schedule.steps == 10 and cfg.schedule.epochs is None
    with pytest.raises(ConfigError, match="set exactly one of"):
        load_config("simclr_resnet18", ["schedule.epochs=null"])


def test_views_follow_the_method():
    cfg = load_config(None, ["method.name=dino"])
    assert cfg.data.views.kind == "multi_crop" and cfg.data.views.n_local == 6
    cfg = load_config(None, ["method.name=dino", "data.views.n_local=2"])
    assert cfg.data.views.n_local == 2


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.1, warmup: 3}\n")
    r = subprocess.run([sys.executable, "-m", "selfsup", "train", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("selfsup: error: unknown key 'optim.warmup'") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "selfsup", "config", "show", "nope.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "config 'nope.yaml' not found (shipped configs:" in r.stderr
