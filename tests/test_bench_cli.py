"""`python -m tlcore bench`: modes, checks before timing, JSON, chart."""
import json

import pytest
import torch

from tlcore.benchmark import cli, suites, timing


def test_fuse_mode_writes_table_json_and_chart(tmp_path, capsys):
    out, chart = tmp_path / "r.json", tmp_path / "r.png"
    code = cli.main(["--modes", "fp16", "--model", "resnet18", "--batch", "1", "--size", "32", "--min-time", "0.05",
                     "--device", "cpu", "--out", str(out), "--plot", str(chart)])
    assert code == 0
    table = capsys.readouterr().out
    assert "tlcore.fuse fp32" in table and "eager fp32" in table
    data = json.loads(out.read_text())
    for key in ("device", "cpu", "torch", "triton", "tlcore_commit", "date"):
        assert key in data["provenance"]
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


def test_modes_and_bad_flags():
    assert cli.parse_modes("all") == ["fuse", "int8", "optim"]
    assert cli.parse_modes("fp16,optim,fuse") == ["fuse", "optim"]
    with pytest.raises(SystemExit, match="unknown mode 'int4'"):
        cli.parse_modes("int4")
    with pytest.raises(SystemExit):
        cli.main(["--batch", "0", "--device", "cpu"])


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
    """On a CPU, after every variant is checked, the timed calls alternate round by round, each variant
    cycling through its own inputs, so a machine whose speed drifts weighs on all alike."""
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
    timed = calls[2:]
    names = [name for name, _ in timed]
    assert len(timed) >= 2 * (1 + 5) and names == ["a", "b"] * (len(timed) // 2)  # warm-up + >= 5 rounds
    assert [x for name, x in timed if name == "a"][:4] == [0, 1, 2, 0]
    assert [x for name, x in timed if name == "b"][:3] == [5, 6, 5]


def test_turns_keep_one_time_per_call_and_round():
    turns = timing.Turns([lambda: None, lambda: sum(range(1000))])
    for _ in range(7):
        turns()
    assert [len(seconds) for seconds in turns.seconds] == [7, 7]
    medians = turns.medians_ms()
    assert len(medians) == 2 and all(m >= 0 for m in medians)


def test_provenance_records_tlcore_settings_and_library_caps(monkeypatch):
    from tlcore.benchmark.provenance import tlcore_settings

    monkeypatch.setenv("TLCORE_INT8_CPU_ISA", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ONEDNN_VERBOSE", "0")
    settings = tlcore_settings()
    assert settings["TLCORE_INT8_CPU_ISA"] == "avx2" and settings["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "ONEDNN_VERBOSE" not in settings
