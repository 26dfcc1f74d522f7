"""Config schema: every bad value names its dotted key and value; overrides; defaults; shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cema_ray import config
from cema_ray.config import (
    apply_overrides, load_config, load_pretrain_config, resolve_output_dir, schema_rows,
)
from cema_ray.errors import ConfigError
from cema_ray.names import CORRUPTIONS

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A minimal run config whose data root exists."""
    root = tmp_path / "fmnist"
    root.mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "runtime": "local", "data": {"root": str(root)},
                                    "edges": {"groups": [{"fraction": 0.5, "stream": {"batch_size": 32}}]}}))
    return path


def error_of(path: Path, *overrides: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), **kw)
    return str(info.value)


def test_defaults_filled(base: Path) -> None:
    cfg = load_config(base)
    assert cfg["name"] == "t" and cfg["runtime"] == "local" and cfg["mode"] == "sync" and cfg["seed"] == 0
    assert cfg["stream"] == {"protocol": "continual", "corruptions": list(CORRUPTIONS), "severity": 5,
                             "batch_size": 64, "samples_per_domain": 1000, "dirichlet_alpha": 0.1}
    assert cfg["edges"]["count"] == 32 and cfg["edges"]["per_host"] == 8 and cfg["edges"]["hosts"] is None
    assert cfg["edges"]["groups"] == [{"name": "g0", "fraction": 0.5, "stream": {"batch_size": 32},
                                       "frame_rate": None, "uplink_samples_per_s": None,
                                       "uplink_bytes_per_s": None,
                                       "model": {"name": None, "checkpoint": None, "allow_unverified": False}}]
    assert cfg["method"]["name"] == "cema" and cfg["method"]["publish_every"] == 1
    # resolved at load: the class count from the data source, and the redundancy margin that depends on it
    assert cfg["method"]["settings"] == {**config.method_registry().get("cema").defaults, "num_classes": 10,
                                         "d_margin": 0.4}
    assert cfg["cloud"] == {"queue_capacity": 8192, "num_cpus": 1.0, "threads": None, "checkpoint_every": 10,
                            "max_restarts": -1, "device": "cpu", "num_gpus": 0.0, "amp": False, "checkpoint_dir": None,
                            "shards": 1, "sync_every": 1, "resources": {}}
    assert cfg["edges"]["fuse_samples"] == 128 and cfg["ray"]["host_step_edges"] == 512
    assert cfg["ray"]["host_num_gpus"] == 0.0 and cfg["ray"]["host_resources"] == {}
    assert cfg["ray"]["object_store_memory_mb"] == 256 and cfg["ray"]["dashboard_host"] == "127.0.0.1"
    assert cfg["faults"] == {"kill_hosts": 0, "kill_cloud": 0, "bad_batches": 0, "raise_in_hosts": 0, "slow_cloud_s": 0.0,
                             "seed": 0}
    assert cfg["output"] == {"dir": None, "progress": True, "report": True}
    assert cfg["models"]["edge"] == {"name": "cema_resnet_s", "checkpoint": None,
                                         "allow_unverified": False}


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my_run.yaml"
    path.write_text("runtime: local\n")
    assert load_config(path, check_paths=False)["name"] == "my_run"


def test_overrides_apply(base: Path) -> None:
    settings_key = sorted(config.method_registry().get("cema").defaults)[0]
    default = config.method_registry().get("cema").defaults[settings_key]
    cfg = load_config(base, ["stream.severity=3", "stream.corruptions=[fog, snow]", "edges.count=4",
                             "edges.groups.0.fraction=0.25", "edges.groups.0.stream.protocol=reset",
                             "ray.address=null", "output.dir=/tmp/x", "runtime=ray",
                             f"method.settings.{settings_key}={yaml.safe_dump(default).splitlines()[0]}"])
    assert cfg["stream"]["severity"] == 3 and cfg["stream"]["corruptions"] == ["fog", "snow"]
    assert cfg["edges"]["count"] == 4 and cfg["runtime"] == "ray" and cfg["output"]["dir"] == "/tmp/x"
    assert cfg["edges"]["groups"][0]["fraction"] == 0.25
    assert cfg["edges"]["groups"][0]["stream"] == {"batch_size": 32, "protocol": "reset"}


def test_override_does_not_touch_input() -> None:
    raw = {"stream": {"severity": 5}}
    out = apply_overrides(raw, ["stream.severity=2"], config.RUN_SCHEMA)
    assert raw == {"stream": {"severity": 5}} and out == {"stream": {"severity": 2}}


def test_int_given_to_float_field_becomes_float(base: Path) -> None:
    cfg = load_config(base, ["cloud.num_cpus=2"])
    assert cfg["cloud"]["num_cpus"] == 2.0 and isinstance(cfg["cloud"]["num_cpus"], float)


def test_severity_message_exact(base: Path) -> None:
    assert error_of(base, "stream.severity=7") == "stream.severity = 7: must be an integer from 1 to 5"


@pytest.mark.parametrize("override, expected", [
    ("stream.severity=0", ["stream.severity = 0", "from 1 to 5"]),
    ("edges.count=-1", ["edges.count = -1", ">= 1"]),
    ("edges.count=true", ["edges.count = true", "an integer"]),  # bool is not int
    ("edges.per_host=0", ["edges.per_host = 0", ">= 1"]),
    ("edges.hosts=0", ["edges.hosts = 0", "null or an integer >= 1"]),
    ("stream.batch_size=0", ["stream.batch_size = 0", ">= 1"]),
    ("stream.samples_per_domain=-5", ["stream.samples_per_domain = -5"]),
    ("stream.dirichlet_alpha=0", ["stream.dirichlet_alpha = 0", "> 0"]),
    ("cloud.queue_capacity=0", ["cloud.queue_capacity = 0"]),
    ("cloud.num_cpus=0", ["cloud.num_cpus = 0", "> 0"]),
    ("cloud.checkpoint_every=-1", ["cloud.checkpoint_every = -1", ">= 0"]),
    ("faults.kill_hosts=-2", ["faults.kill_hosts = -2", ">= 0"]),
    ("seed=1.5", ["seed = 1.5", "an integer"]),
    ("seed=false", ["seed = false", "an integer"]),
    ("runtime=cluster", ["runtime = 'cluster'", "'local', 'ray'"]),
    ("mode=asinc", ["mode = 'asinc'", "did you mean 'async'"]),
    ("runtime=1", ["runtime = 1", "one of"]),
    ("ray.include_dashboard=maybe", ["ray.include_dashboard = 'maybe'", "true or false"]),
    ("ray.object_store_memory_mb=10", ["ray.object_store_memory_mb = 10", ">= 75"]),
    ("method.publish_every=0", ["method.publish_every = 0"]),
    ("method.student_scope=per_group", ["method.student_scope = 'per_group'", "'shared', 'per_edge'"]),
    ("stream.protocol=continuous", ["stream.protocol = 'continuous'", "continual", "label_shift"]),
    ("stream.corruptions=[fog, smog]", ["stream.corruptions.1 = 'smog'", "unknown corruption", "clean"]),
    ("stream.corruptions=[]", ["stream.corruptions = []", "non-empty"]),
    ("stream.corruptions=fog", ["stream.corruptions = 'fog'", "a list of strings"]),
    ("method.name=cemaa", ["method.name = 'cemaa'", "unknown method", "did you mean 'cema'", "source"]),
    ("method.settings.d_margn=0.4", ["method.settings.d_margn = 0.4", "unknown setting of method 'cema'"]),
    ("models.edge.name=resnet_xx", ["models.edge.name = 'resnet_xx'", "unknown model", "cema_resnet_s",
                                    "timm:<name>"]),
    ("models.foundation.name=timm:", ["models.foundation.name = 'timm:'", "unknown model"]),
    ("data.source=mnist-fashion", ["data.source = 'mnist-fashion'", "unknown data source", "fashion-mnist"]),
    ("data.split=val", ["data.split = 'val'", "'train', 'test'"]),
    ("edges.groups.0.fraction=0", ["edges.groups.0.fraction = 0", "in (0, 1]"]),
    ("edges.groups.0.fraction=1.5", ["edges.groups.0.fraction = 1.5", "in (0, 1]"]),
    ("edges.groups.0.frame_rate=-1", ["edges.groups.0.frame_rate = -1", "> 0"]),
    ("edges.groups.0.stream.severity=9", ["edges.groups.0.stream.severity = 9", "from 1 to 5"]),
    ("edges.groups.0.stream.corruptions=[haze]", ["edges.groups.0.stream.corruptions.0 = 'haze'"]),
    ("edges.groups=[{fraction: 0.6}, {fraction: 0.5}]", ["edges.groups = [0.6, 0.5]", "sum to 1.1", "at most 1"]),
    ("edges.groups=[{fraction: 0.5, strem: {}}]", ["edges.groups.0.strem = {}", "did you mean 'stream'"]),
    ("edges.hosts=64", ["edges.hosts = 64", "at most edges.count (32)"]),
])
def test_bad_values_name_key_and_value(base: Path, override: str, expected: list[str]) -> None:
    message = error_of(base, override)
    for text in expected:
        assert text in message, message


def test_setting_type_follows_default(base: Path) -> None:
    defaults = config.method_registry().get("cema").defaults
    floats = [k for k, v in defaults.items() if isinstance(v, float)]
    if not floats:
        pytest.skip("cema has no float setting")
    message = error_of(base, f"method.settings.{floats[0]}=high")
    assert f"method.settings.{floats[0]} = 'high'" in message and "a number" in message


def test_unknown_keys_suggest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nstram: {severity: 3}\n")
    message = error_of(path, check_paths=False)
    assert "stram = {severity: 3}" in message and "did you mean 'stream'" in message
    path.write_text("name: x\nstream: {severty: 3}\n")
    assert "stream.severty = 3: unknown key (did you mean 'severity'?)" in error_of(path, check_paths=False)


@pytest.mark.parametrize("override, expected", [
    ("stream.severty=3", ["stream.severty = 3", "did you mean 'severity'", "in 'stream'"]),
    ("strem.severity=3", ["strem.severity = 3", "did you mean 'stream'"]),
    ("method.settings=3", ["method.settings = 3", "a mapping"]),
    ("edges.groups.5.fraction=0.1", ["edges.groups.5.fraction = 0.1", "has 1 item"]),
    ("stream.severity.x=1", ["stream.severity.x = 1", "no key 'x'"]),
    ("severity", ["'severity'", "key=value"]),
])
def test_bad_overrides(base: Path, override: str, expected: list[str]) -> None:
    message = error_of(base, override)
    for text in expected:
        assert text in message, message


def test_missing_data_root_names_key_path_and_env(base: Path, tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "nowhere"
    message = error_of(base, f"data.root={missing}")
    assert "data.root" in message and str(missing) in message and "CEMA_FASHION_MNIST_ROOT" in message
    monkeypatch.setenv("CEMA_FASHION_MNIST_ROOT", str(missing))
    message = error_of(base, "data.root=null")
    assert "data.root = null" in message and str(missing) in message and "$CEMA_FASHION_MNIST_ROOT" in message
    monkeypatch.delenv("CEMA_CIFAR10_ROOT", raising=False)
    message = error_of(base, "data.root=null", "data.source=cifar10-folder")
    assert "data.root = null" in message and "CEMA_CIFAR10_ROOT" in message


def test_data_root_resolution_order(base: Path, tmp_path: Path, monkeypatch) -> None:
    env_root = tmp_path / "from_env"
    env_root.mkdir()
    monkeypatch.setenv("CEMA_CIFAR10_ROOT", str(env_root))
    cfg = load_config(base, ["data.root=null", "data.source=cifar10-folder"])
    assert cfg["data"]["root"] == str(env_root)
    given = load_config(base, ["data.source=cifar10-folder"])["data"]["root"]
    assert given == str(tmp_path / "fmnist")  # an explicit data.root wins over the env var
    monkeypatch.delenv("CEMA_FASHION_MNIST_ROOT", raising=False)
    cfg = load_config(base, ["data.root=null"], check_paths=False)
    assert cfg["data"]["root"] == "/usr/share/datasets/fashion-mnist"


def test_bad_files(tmp_path: Path) -> None:
    assert "does not exist" in error_of(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "not valid YAML" in error_of(bad)
    bad.write_text("- a\n- b\n")
    assert "must be a mapping" in error_of(bad)


def test_output_dir_default(base: Path) -> None:
    from datetime import datetime

    cfg = load_config(base)
    assert resolve_output_dir(cfg, datetime(2024, 5, 6, 7, 8, 9)) == Path("runs/t-20240506-070809")
    assert resolve_output_dir(load_config(base, ["output.dir=out/a"])) == Path("out/a")


def test_pretrain_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "cema_resnet_s", "role": "edge"},
                                    "output": {"checkpoint": "x.safetensors"}}))
    cfg = load_pretrain_config(path, check_paths=False)
    assert cfg["name"] == "p" and cfg["train"]["epochs"] == 10 and cfg["train"]["augment"] == "basic"
    assert cfg["output"]["work_dir"] == "pretrain_work"
    cases = {"train.momentum=1": "[0, 1)", "train.label_smoothing=1.0": "[0, 1)", "train.epochs=0": ">= 1",
             "train.lr=0": "> 0", "train.weight_decay=-0.1": ">= 0", "train.augment=cutmix": "'basic', 'augmix'",
             "model.role=teacher": "'edge', 'foundation'", "train.eval_every=0": ">= 1",
             "model.name=vit": "unknown model", "train.threads=0": "null or an integer >= 1"}
    for override, allowed in cases.items():
        with pytest.raises(ConfigError) as info:
            load_pretrain_config(path, [override], check_paths=False)
        key, value = override.split("=")
        assert str(info.value).startswith(f"{key} = ") and value in str(info.value) and allowed in str(info.value)
    path.write_text(yaml.safe_dump({"model": {"name": "cema_resnet_s", "role": "edge"}}))
    with pytest.raises(ConfigError, match="output.checkpoint: missing"):
        load_pretrain_config(path, check_paths=False)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    text = path.read_text()
    assert "/work/" not in text and "/usr/share" not in yaml.safe_dump(yaml.safe_load(text))  # roots via env vars
    if path.name.startswith("pretrain_"):
        cfg = load_pretrain_config(path, check_paths=False)
        assert cfg["output"]["checkpoint"].startswith("checkpoints/")
    else:
        cfg = load_config(path, check_paths=False)
        assert cfg["name"] == path.stem
        assert sum(g["fraction"] for g in cfg["edges"]["groups"]) <= 1


def test_quickstart_shape() -> None:
    cfg = load_config(CONFIGS / "quickstart.yaml", check_paths=False)
    groups = cfg["edges"]["groups"]
    assert cfg["runtime"] == "ray" and cfg["mode"] == "sync" and cfg["edges"]["count"] == 32
    assert 2 <= len(groups) <= 3 and sum(g["fraction"] for g in groups) == pytest.approx(1.0)
    from cema_ray.runtime.fleet import edge_plans

    streams = [p.spec for p in edge_plans(cfg)]
    assert {s.batch_size for s in streams} == {32, 64}
    assert {s.protocol for s in streams} == {"continual", "reset"}
    assert all(len(s.corruptions) * s.samples_per_domain <= 1000 for s in streams)
    assert cfg["models"]["edge"]["checkpoint"] == "checkpoints/fashion-mnist/edge.safetensors"


def test_schema_rows_cover_every_leaf() -> None:
    rows = {key: (default, allowed) for key, default, allowed, _ in schema_rows()}
    assert rows["stream.severity"] == ("5", "an integer from 1 to 5")
    assert rows["edges.groups.<i>.fraction"] == ("required", "a number in (0, 1]")
    assert rows["edges.groups.<i>.stream.<key>"][0] == "unset"
    assert "ray.dashboard_host" in rows and "output.report" in rows and len(rows) > 40


def test_mirrored_settings_follow_config_keys(base: Path) -> None:
    defaults = config.method_registry().get("cema").defaults
    if "publish_every" not in defaults:
        pytest.skip("cema has no publish_every setting")
    cfg = load_config(base, ["method.publish_every=4", "data.num_classes=10"])
    assert cfg["method"]["settings"]["publish_every"] == 4
    if "num_classes" in defaults:
        assert cfg["method"]["settings"]["num_classes"] == 10
    message = error_of(base, "method.publish_every=4", "method.settings.publish_every=2")
    assert "method.settings.publish_every = 2: conflicts with method.publish_every = 4" in message


def test_readme_documents_every_key() -> None:
    readme = (CONFIGS.parent / "README.md").read_text()
    for schema in (config.RUN_SCHEMA, config.PRETRAIN_SCHEMA):
        for key, default, allowed, _ in schema_rows(schema):
            assert f"| `{key}` |" in readme, key


def test_runs_go_to_the_storage_setting_then_a_stable_folder_under_a_ray_job(base: Path, monkeypatch) -> None:
    from datetime import datetime

    from cema_ray.config import resolve_output_dir

    cfg = load_config(base)
    now = datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.delenv("CEMA_RAY_STORAGE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_output_dir(cfg, now) == Path("runs") / "t-20260102-030405"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for a job driver
    assert resolve_output_dir(cfg, now) == Path("~/cema_ray_runs").expanduser() / "t-20260102-030405"
    monkeypatch.setenv("CEMA_RAY_STORAGE", "/data/runs")
    assert resolve_output_dir(cfg, now) == Path("/data/runs/t-20260102-030405")
    cfg["output"]["dir"] = "/explicit"
    assert resolve_output_dir(cfg, now) == Path("/explicit")


@pytest.mark.parametrize("value,what", [("abc", "must be null or a number > 0"), ("-3", "must be null or a number > 0"),
                                        ("0", "must be null or a number > 0")])
def test_settings_whose_default_is_null_are_checked_at_load(base: Path, value: str, what: str) -> None:
    message = error_of(base, "method.name=cema", f"method.settings.d_margin={value}")
    assert message.startswith(f"method.settings.d_margin = ") and what in message
    assert load_config(base, ["method.name=cema", "method.settings.d_margin=0.2"])["method"]["settings"]["d_margin"] == 0.2
    assert "must be null or an integer >= 1" in error_of(base, "method.name=cema-fleet", "method.settings.num_classes=0")


def test_d_margin_has_one_range_in_every_method_that_has_it(make_run_config) -> None:
    """The redundancy margin is declared once (methods.common.d_margin_setting): 0 is refused by every method."""
    from cema_ray.methods.base import METHODS

    having = [name for name in METHODS.names() if "d_margin" in METHODS.get(name).settings]
    assert {"cema", "eata", "cema-fleet"} <= set(having)
    assert len({(METHODS.get(n).settings["d_margin"].lo, METHODS.get(n).settings["d_margin"].lo_open)
                for n in having}) == 1
    for name in having:
        with pytest.raises(ConfigError, match="d_margin"):
            make_run_config(f"method.name={name}", "method.settings.d_margin=0")
