"""The `threads` setting: where the count comes from, and that it is applied and written down."""
import torch

from cema_ray import threads
from cema_ray.bench import main as bench_main


def test_setting_wins_then_omp_then_the_usable_cores(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve_threads(2) == (2, "threads")
    assert threads.resolve_threads(None) == (3, "$OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "ray_assigned_cpus", lambda: None)
    monkeypatch.setattr(threads, "os_cores", lambda: 5)
    assert threads.resolve_threads(None) == (5, "the cores this process may use")
    monkeypatch.setattr(threads, "ray_assigned_cpus", lambda: 1)
    assert threads.resolve_threads(None) == (1, "Ray's CPU assignment")


def test_os_cores_honours_affinity_and_a_cgroup_quota(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", cpu_max)
    assert threads.os_cores() == 4  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert threads.os_cores() == 4
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of quota -> 2 threads
    assert threads.os_cores() == 2


def test_apply_threads_sets_torch(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.apply_threads(None) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bench_corruptions_times_every_cell(tmp_path, capsys) -> None:
    out = tmp_path / "cb"
    before = torch.get_num_threads()
    try:
        assert bench_main(["corruptions", "--names", "glass_blur,contrast", "--sizes", "16,24", "--batch", "4",
                           "--repeat", "2", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    import json

    rows = json.loads((out / "corruptions.json").read_text())
    assert [(r["corruption"], r["size"]) for r in rows] == [("glass_blur", 16), ("contrast", 16),
                                                             ("glass_blur", 24), ("contrast", 24)]
    assert all(r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["threads"] == 1 for r in rows)
    assert "| glass_blur |" in (out / "corruptions.md").read_text()
