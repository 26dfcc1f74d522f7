"""edges.distributions: per-edge values drawn from distributions, validated once, seeded per (seed, edge, key)."""
from __future__ import annotations

import math

import pytest

from cema_ray.errors import ConfigError
from cema_ray.runtime.fleet import edge_plans

MIXED = ("edges.distributions={batch_size: {choice: [16, 32, 48], weights: [1, 0, 3]}, severity: {randint: [2, 4]},"
         " dirichlet_alpha: {uniform: [0.5, 1.5]}, frame_rate: {loguniform: [1, 100]},"
         " corruptions: {permute: [gaussian_noise, fog, snow]}, uplink_samples_per_s: {choice: [null, 8]},"
         " uplink_bytes_per_s: {randint: [100, 200]}}")


def _values(plans):
    return [(p.spec, p.profile) for p in plans]


def test_each_form_draws_within_its_bounds(make_run_config) -> None:
    plans = edge_plans(make_run_config("edges.count=60", MIXED))
    assert len(plans) == 60
    batch = [p.spec.batch_size for p in plans]
    assert set(batch) == {16, 48}  # weight 0 never drawn
    severity = [p.spec.severity for p in plans]
    assert set(severity) == {2, 3, 4} and all(type(s) is int for s in severity)
    alpha = [p.spec.dirichlet_alpha for p in plans]
    assert all(0.5 <= a <= 1.5 and type(a) is float for a in alpha) and len(set(alpha)) == 60
    rate = [p.profile.frame_rate for p in plans]
    assert all(1.0 <= r <= 100.0 and type(r) is float for r in rate)
    assert min(rate) < 10 < max(rate)  # log-uniform: both decades are drawn
    orders = {p.spec.corruptions for p in plans}
    assert all(sorted(o) == ["fog", "gaussian_noise", "snow"] for o in orders) and len(orders) > 1
    assert {p.profile.uplink_samples_per_s for p in plans} == {None, 8.0}
    up_bytes = [p.profile.uplink_bytes_per_s for p in plans]
    assert all(100 <= b <= 200 and b == int(b) and type(b) is float for b in up_bytes)
    # untouched keys keep the top-level stream; no group: the default profile name
    assert {p.spec.samples_per_domain for p in plans} == {64} and {p.spec.protocol for p in plans} == {"continual"}
    assert {p.profile.group for p in plans} == {"default"}


def test_choice_draws_whole_corruption_lists_and_protocols(make_run_config) -> None:
    cfg = make_run_config("edges.count=30", "edges.distributions={corruptions: {choice: [[fog], [snow, frost]]},"
                                            " protocol: {choice: [reset, mixed]}}")
    plans = edge_plans(cfg)
    assert {p.spec.corruptions for p in plans} == {("fog",), ("snow", "frost")}
    assert {p.spec.protocol for p in plans} == {"reset", "mixed"}


def test_same_config_same_fleet_and_the_seed_matters(make_run_config) -> None:
    a = edge_plans(make_run_config("edges.count=20", MIXED))
    b = edge_plans(make_run_config("edges.count=20", MIXED))
    assert _values(a) == _values(b)
    other = edge_plans(make_run_config("edges.count=20", "edges.heterogeneity_seed=3", MIXED))
    assert _values(other) != _values(a)
    # heterogeneity_seed null: the run seed
    by_run_seed = edge_plans(make_run_config("edges.count=20", "seed=3", MIXED))
    assert [p.profile for p in by_run_seed] == [p.profile for p in other]


def test_adding_edges_keeps_the_first_edges_values(make_run_config) -> None:
    small = edge_plans(make_run_config("edges.count=5", MIXED))
    large = edge_plans(make_run_config("edges.count=40", MIXED))
    assert _values(large[:5]) == _values(small)


def test_a_key_draw_does_not_depend_on_the_other_keys(make_run_config) -> None:
    alone = edge_plans(make_run_config("edges.count=10", "edges.distributions.frame_rate={uniform: [1, 5]}"))
    both = edge_plans(make_run_config("edges.count=10", "edges.distributions.frame_rate={uniform: [1, 5]}",
                                      "edges.distributions.batch_size={randint: [1, 9]}"))
    assert [p.profile.frame_rate for p in alone] == [p.profile.frame_rate for p in both]
    assert len({p.spec.batch_size for p in both}) > 1


def test_group_keys_win_over_distributions(make_run_config) -> None:
    cfg = make_run_config(
        "edges.count=20",
        "edges.distributions={batch_size: {choice: [16, 32]}, severity: {randint: [1, 2]},"
        " frame_rate: {uniform: [10, 20]}, uplink_samples_per_s: {uniform: [1, 2]}}",
        "edges.groups=[{name: pinned, fraction: 0.5, stream: {batch_size: 8}, frame_rate: 3.0,"
        " uplink_bytes_per_s: 5000.0}]",
    )
    plans = edge_plans(cfg)
    pinned = [p for p in plans if p.profile.group == "pinned"]
    rest = [p for p in plans if p.profile.group == "default"]
    assert len(pinned) == len(rest) == 10
    for p in pinned:
        assert p.spec.batch_size == 8 and p.profile.frame_rate == 3.0
        # a group that sets an uplink budget sets the whole budget: the drawn samples/s is dropped
        assert p.profile.uplink_bytes_per_s == 5000.0 and p.profile.uplink_samples_per_s is None
        assert p.spec.severity in (1, 2)  # the group does not set severity: the draw stands
    for p in rest:
        assert p.spec.batch_size in (16, 32) and 10 <= p.profile.frame_rate <= 20
        assert 1 <= p.profile.uplink_samples_per_s <= 2 and p.profile.uplink_bytes_per_s is None


def test_a_null_group_value_leaves_the_draw(make_run_config) -> None:
    cfg = make_run_config("edges.count=4", "edges.distributions={frame_rate: {uniform: [10, 20]}}",
                          "edges.groups=[{name: g, fraction: 1.0, stream: {severity: 2}}]")
    for p in edge_plans(cfg):
        assert p.profile.group == "g" and p.spec.severity == 2 and 10 <= p.profile.frame_rate <= 20


def test_no_distributions_is_the_top_level_stream(make_run_config) -> None:
    cfg = make_run_config()
    assert cfg["edges"]["distributions"] == {}
    for p in edge_plans(cfg):
        assert p.spec.batch_size == 32 and p.spec.corruptions == ("gaussian_noise", "fog")
        assert p.profile.frame_rate is None and p.profile.uplink_samples_per_s is None


def test_validation_normalises(make_run_config) -> None:
    cfg = make_run_config("edges.distributions={frame_rate: {choice: [1, null], weights: [1, 2]},"
                          " dirichlet_alpha: {uniform: [1, 2]}, batch_size: {randint: [4, 8]}}")
    d = cfg["edges"]["distributions"]
    assert d["frame_rate"] == {"choice": [1.0, None], "weights": [1.0, 2.0]}
    assert d["dirichlet_alpha"] == {"uniform": [1.0, 2.0]} and d["batch_size"] == {"randint": [4, 8]}


@pytest.mark.parametrize("dist, where, words", [
    ("{batchsize: {choice: [16]}}", "edges.distributions.batchsize", "did you mean 'batch_size'"),
    ("{seed: {randint: [1, 2]}}", "edges.distributions.seed", "unknown key"),
    ("{batch_size: 16}", "edges.distributions.batch_size", "must be a mapping"),
    ("{batch_size: {choice: [16], randint: [1, 2]}}", "edges.distributions.batch_size", "exactly one of"),
    ("{batch_size: {}}", "edges.distributions.batch_size", "exactly one of"),
    ("{batch_size: {choise: [16]}}", "edges.distributions.batch_size.choise", "did you mean 'choice'"),
    ("{frame_rate: {uniform: [5, 1]}}", "edges.distributions.frame_rate.uniform", "must be <= hi"),
    ("{batch_size: {randint: [9, 2]}}", "edges.distributions.batch_size.randint", "must be <= hi"),
    ("{frame_rate: {uniform: [1]}}", "edges.distributions.frame_rate.uniform", "[lo, hi]"),
    ("{frame_rate: {uniform: [0, 5]}}", "edges.distributions.frame_rate.uniform.0", "> 0"),
    ("{frame_rate: {loguniform: [0, 5]}}", "edges.distributions.frame_rate.loguniform", "lo > 0"),
    ("{frame_rate: {loguniform: [-1, 5]}}", "edges.distributions.frame_rate.loguniform", "lo > 0"),
    ("{batch_size: {uniform: [1, 5]}}", "edges.distributions.batch_size.uniform", "use randint"),
    ("{protocol: {randint: [1, 5]}}", "edges.distributions.protocol.randint", "use choice"),
    ("{batch_size: {randint: [1.5, 5]}}", "edges.distributions.batch_size.randint", "two integers"),
    ("{batch_size: {randint: [0, 5]}}", "edges.distributions.batch_size.randint.0", ">= 1"),
    ("{severity: {randint: [3, 6]}}", "edges.distributions.severity.randint.1", "from 1 to 5"),
    ("{batch_size: {choice: [16, 32], weights: [1]}}", "edges.distributions.batch_size.weights", "2 numbers"),
    ("{batch_size: {choice: [16, 32], weights: [0, 0]}}", "edges.distributions.batch_size.weights", "all be 0"),
    ("{batch_size: {choice: [16, 32], weights: [1, -1]}}", "edges.distributions.batch_size.weights.1", ">= 0"),
    ("{batch_size: {randint: [1, 5], weights: [1, 1]}}", "edges.distributions.batch_size.weights", "with choice"),
    ("{batch_size: {choice: []}}", "edges.distributions.batch_size.choice", "non-empty"),
    ("{severity: {choice: [3, 7]}}", "edges.distributions.severity.choice.1 = 7", "from 1 to 5"),
    ("{batch_size: {choice: [16, true]}}", "edges.distributions.batch_size.choice.1", "an integer"),
    ("{protocol: {choice: [reset, contineous]}}", "edges.distributions.protocol.choice.1",
     "did you mean 'continual'"),
    ("{frame_rate: {choice: [2.0, -1]}}", "edges.distributions.frame_rate.choice.1", "> 0"),
    ("{batch_size: {permute: [16, 32]}}", "edges.distributions.batch_size.permute",
     "only edges.distributions.corruptions"),
    ("{corruptions: {permute: [fog, smog]}}", "edges.distributions.corruptions.permute.1", "unknown corruption"),
    ("{corruptions: {permute: []}}", "edges.distributions.corruptions.permute", "non-empty"),
    ("{corruptions: {choice: [fog, snow]}}", "edges.distributions.corruptions.choice.0", "a whole list"),
    ("{corruptions: {choice: [[fog], []]}}", "edges.distributions.corruptions.choice.1", "non-empty"),
    ("{corruptions: {choice: [[fog], [snw]]}}", "edges.distributions.corruptions.choice.1.0", "did you mean 'snow'"),
])
def test_bad_specs_name_the_dotted_key(make_run_config, dist: str, where: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_run_config(f"edges.distributions={dist}")
    message = str(info.value)
    assert message.startswith(where) and words in message, message


def test_distributions_must_be_a_mapping(make_run_config) -> None:
    with pytest.raises(ConfigError, match=r"^edges\.distributions = \[1, 2\]: must be a mapping"):
        make_run_config("edges.distributions=[1, 2]")


def test_loguniform_is_log_spread(make_run_config) -> None:
    plans = edge_plans(make_run_config("edges.count=400", "edges.distributions={frame_rate: {loguniform: [1, 10000]}}"))
    logs = [math.log10(p.profile.frame_rate) for p in plans]
    assert 1.6 < sum(logs) / len(logs) < 2.4  # the mean of log10 of a log-uniform on [1, 1e4] is 2
