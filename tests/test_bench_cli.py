"""`python -m tlcore bench`: modes, checks before timing, JSON, chart."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tlcore.benchmark import cli, suites, timing


def test_fuse_mode_writes_table_json_and_chart(tmp_path, capsys):
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    code = cli.main(["--modes", "fp16", "--model", "resnet18", "--batch", "1", "--size", "32", "--min-time", "0.05",
                     "--device", "cpu", "--out", str(out), "--plot", str(chart)])
    assert code == 0
    table = capsys.readouterr().out
    assert "resnet18, batch 1, 32x32" in table and "tlcore.fuse fp32" in table and "eager fp32" in table
    data = json.loads(out.read_text())
    for key in ("device", "cpu", "torch", "triton", "tlcore_commit", "date", "tlcore_cpu_isa"):
        assert key in data["provenance"]
    assert data["provenance"]["run"] == {"model": "resnet18", "batch": 1, "size": 32, "modes": ["fuse"],
                                         "min_time_s": 0.05, "compile": False, "compile_mode": None,
                                         "low_precision": "fp32 (CPU)"}
    rows = {r["variant"]: r for r in data["results"]}
    assert rows["eager fp32"]["speedup"] == pytest.approx(1.0)
    fused = rows["tlcore.fuse fp32"]
    assert fused["status"] == "ok" and fused["median_ms"] > 0 and fused["rel_error"] < 1e-4
    assert fused["rate_unit"] == "TFLOP/s" and 0 < fused["peak_share"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_variant_that_disagrees_is_failed_not_timed():
    reference = torch.ones(4)
    suite = suites.Suite("fuse", "toy", 1, torch.device("cpu"), "right", reference, 1.0, "TFLOP/s", 1.0)
    suite.variants = [suites.Variant("right", lambda x: x, [torch.ones(4)], 1e-3),
                      suites.Variant("wrong", lambda x: 2 * x, [torch.ones(4)], 1e-3),
                      suites.Variant("nan", lambda x: x * float("nan"), [torch.ones(4)], 1e-3),
                      suites.Variant("raises", lambda x: x[99], [torch.ones(4)], 1e-3)]
    results = {r.variant: r for r in suites.run(suite, min_run_time_s=0.01)}
    assert results["right"].status == "ok" and results["right"].median_ms > 0
    for name in ("wrong", "nan", "raises"):
        assert results[name].status.startswith("failed") and results[name].median_ms is None
    assert results["raises"].status.startswith("failed: IndexError")


def test_modes_and_bad_flags(monkeypatch):
    assert cli.parse_modes("all") == ["fuse", "int8", "optim"]
    assert cli.parse_modes("fp16,optim,fuse") == ["fuse", "optim"]
    assert cli.parse_modes("int8,") == ["int8"]
    with pytest.raises(SystemExit, match="unknown mode 'int4'"):
        cli.parse_modes("int4")
    with pytest.raises(SystemExit, match="names no mode"):
        cli.parse_modes(" , ")
    monkeypatch.setattr(cli.suites, "run", lambda *args: pytest.fail("ran the suite"))
    for flags, message in ((["--batch", "0"], "--batch 0: must be at least 1"),
                           (["--size", "16"], "--size 16: must be at least 32"),
                           (["--min-time", "0"], "--min-time 0.0: must be above 0"),
                           (["--modes", "int9"], "unknown mode 'int9'")):
        with pytest.raises(SystemExit, match=message):
            cli.main(flags + ["--device", "cpu"])


def test_options_that_do_not_apply_are_named(capsys, monkeypatch):
    monkeypatch.setattr(cli.suites, "run", lambda *args: [])
    monkeypatch.setattr(cli.suites, "optim_suite", lambda *args: SimpleNamespace(variants=[]))
    assert cli.main(["--modes", "optim", "--device", "cpu", "--dtype", "bf16", "--compile"]) == 0
    assert "note: --dtype, --compile does not apply to this run" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--out", "--plot"])
@pytest.mark.parametrize("where", ["missing folder", "a folder", "/proc"])
def test_unwritable_output_paths_stop_before_the_run(option, where, tmp_path, monkeypatch):
    """Tried before the run: a folder that exists but takes no new file (/proc, even for root) too."""
    monkeypatch.setattr(cli.suites, "run", lambda *args: pytest.fail("ran the suite"))
    path = {"missing folder": tmp_path / "missing" / "r.png", "a folder": tmp_path / "r.png",
            "/proc": Path("/proc/tlcore-bench-r.png")}[where]
    if where == "a folder":
        path.mkdir()
    with pytest.raises(SystemExit, match=f"{option} .*cannot write it"):
        cli.main(["--modes", "optim", "--device", "cpu", option, str(path)])
    assert where != "missing folder" or not path.parent.exists()


def test_plot_must_be_a_png_named_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.suites, "run", lambda *args: pytest.fail("ran the suite"))
    for name in ("chart", "chart.jpg"):
        with pytest.raises(SystemExit, match=f"--plot .*{name}: the chart is a PNG"):
            cli.main(["--modes", "optim", "--device", "cpu", "--plot", str(tmp_path / name)])
    assert list(tmp_path.iterdir()) == []


def test_fp32_variants_on_a_gpu_get_tf32_tolerance_when_torch_allows_tf32(monkeypatch):
    """torch runs fp32 convs on GPUs in TF32 by default (fp16's mantissa): checked at fp32's 1e-3, a
    correct eager fp32 ResNet would be reported failed."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert suites._tolerance(torch.float32, cuda) == suites.TOLERANCE[torch.float16]
    assert suites._tolerance(torch.float32, cpu) == suites.TOLERANCE[torch.float32]
    assert suites._tolerance(torch.bfloat16, cuda) == suites.TOLERANCE[torch.bfloat16]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert suites._tolerance(torch.float32, cuda) == suites.TOLERANCE[torch.float32]


def test_cpu_variants_are_timed_in_turns():
    """On a CPU, after every variant is checked, the timed calls take turns, every other round in
    reverse order, each variant cycling through its own inputs, so a machine whose speed drifts
    weighs on all alike."""
    calls = []

    def variant(name):
        def fn(x):
            calls.append((name, int(x)))
            return torch.ones(4)
        return fn

    suite = suites.Suite("fuse", "toy", 1, torch.device("cpu"), "a", torch.ones(4), 1.0, "TFLOP/s", 1.0)
    suite.variants = [suites.Variant("a", variant("a"), [0, 1, 2], 1e-3),
                      suites.Variant("wrong", lambda x: 2 * torch.ones(4), [0], 1e-3),
                      suites.Variant("b", variant("b"), [5, 6], 1e-3)]
    results = {r.variant: r for r in suites.run(suite, min_run_time_s=0.01)}
    assert results["a"].median_ms > 0 and results["b"].median_ms > 0 and results["wrong"].median_ms is None
    assert calls[:2] == [("a", 0), ("b", 5)]  # the checks
    names = [name for name, _ in calls[2:]]
    rounds = len(names) // 2
    assert rounds >= 1 + 5 and names == ["a", "b", "b", "a"] * (rounds // 2) + ["a", "b"] * (rounds % 2)
    assert [x for name, x in calls[2:] if name == "a"][:4] == [0, 1, 2, 0]
    assert [x for name, x in calls[2:] if name == "b"][:3] == [5, 6, 5]


def test_a_variant_that_raises_while_timed_fails_alone():
    timed_calls = 0

    def flaky(x):
        nonlocal timed_calls
        timed_calls += 1
        if timed_calls == 3:  # the check, the warm-up, then this
            raise RuntimeError("out of memory")
        return x

    suite = suites.Suite("fuse", "toy", 1, torch.device("cpu"), "steady", torch.ones(4), 1.0, "TFLOP/s", 1.0)
    suite.variants = [suites.Variant("flaky", flaky, [torch.ones(4)], 1e-3),
                      suites.Variant("steady", lambda x: x, [torch.ones(4)], 1e-3)]
    results = {r.variant: r for r in suites.run(suite, min_run_time_s=0.01)}
    assert results["flaky"].status == "failed while timed: RuntimeError: out of memory"
    assert results["flaky"].median_ms is None and results["flaky"].speedup is None
    assert results["steady"].status == "ok" and results["steady"].median_ms > 0
    assert timed_calls == 3  # left out of the later rounds


def test_turns_record_one_time_per_call_and_round_after_the_warm_up():
    work = lambda: sum(range(1000))  # noqa: E731
    turns = timing.Turns([work, work])
    turns.warm_up()
    assert turns.seconds == [[], []]
    for _ in range(7):
        turns()
    assert [len(seconds) for seconds in turns.seconds] == [7, 7] and turns.rounds == 8
    assert all(median > 0 for median in turns.medians_ms())


def test_provenance_records_tlcore_settings_and_library_caps(monkeypatch):
    from tlcore.benchmark.provenance import library_caps, provenance, tlcore_settings

    monkeypatch.setenv("TLCORE_INT8_CPU_ISA", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert tlcore_settings()["TLCORE_INT8_CPU_ISA"] == "avx2" and "ONEDNN_MAX_CPU_ISA" not in tlcore_settings()
    assert library_caps() == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert provenance(torch.device("cpu"))["library_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_timing_measures_kernels_and_declines_a_host_sync():
    """graph_median_ms times a capturable call (rotating its inputs) and gives None, leaving the GPU
    usable, for one that synchronises with the host."""
    inputs = [torch.randn(2048, 2048, device="cuda") for _ in range(2)]
    ms = timing.graph_median_ms(lambda x: x @ x, inputs, rep_ms=50)
    assert ms is not None and 0 < ms < timing.median_ms(lambda x: x @ x, inputs, torch.device("cuda"), 0.2) * 2
    assert timing.graph_median_ms(lambda x: x.sum().item(), inputs, rep_ms=50) is None
    assert torch.equal(inputs[0] + 0, inputs[0])
