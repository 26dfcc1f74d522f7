"""How edges are spread over EdgeHost actors (pure functions, no Ray instance needed)."""
from __future__ import annotations

from cema_ray.runtime.ray_runner import host_count, split_hosts


def test_host_count_follows_per_host_and_explicit_hosts():
    assert host_count(32, 8, None, free_cpus=10, host_cpus=0.5) == 4
    assert host_count(33, 8, None, free_cpus=10, host_cpus=0.5) == 5
    assert host_count(32, 8, 3, free_cpus=10, host_cpus=0.5) == 3


def test_host_count_is_capped_by_the_cluster_so_no_actor_waits_forever():
    assert host_count(1024, 8, None, free_cpus=3, host_cpus=0.5) == 6  # 128 wanted, 6 fit
    assert host_count(1024, 8, 50, free_cpus=1, host_cpus=0.5) == 2
    assert host_count(4, 1, None, free_cpus=0, host_cpus=0.5) == 1  # at least one host
    assert host_count(2, 1, 10, free_cpus=100, host_cpus=0.5) == 2  # never more hosts than edges


def test_split_hosts_is_contiguous_even_and_complete():
    plans = list(range(10))
    groups = split_hosts(plans, 4)
    assert [len(g) for g in groups] == [3, 3, 2, 2]
    assert [p for g in groups for p in g] == plans
