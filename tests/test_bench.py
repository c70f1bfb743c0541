"""`mixtral-offload bench`: option parsing, the kernel bench's wiring, and one real decode child (structure only)."""
import json

import pytest
from click.testing import CliRunner

from mixtral_offload import benchmark
from mixtral_offload.cli.main import cli
from mixtral_offload.offload.store.convert import convert


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("bench") / "q4"
    convert(tiny_checkpoint[0], out, bits=4, group_size=32, progress=False)
    return out


def test_decode_takes_several_values_after_one_flag(monkeypatch, tiny_converted):
    seen = {}

    def fake_report(specs, bandwidth_gbs=None, log=None):
        seen["specs"] = specs
        return {"results": []}

    monkeypatch.setattr(benchmark, "decode_report", fake_report)
    result = CliRunner().invoke(cli, ["bench", "decode", "--experts-fraction", "0.5", "--experts-fraction", "0.25",
                                      "--budget", "1GiB", "--budget", "2GiB", str(tiny_converted), "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    specs = seen["specs"]
    assert [s.label for s in specs] == ["resident", "budget 1GiB", "budget 2GiB", "50% of experts", "25% of experts"]
    assert all(s.model == str(tiny_converted) and s.repeats == 1 for s in specs)
    assert [s.experts_fraction for s in specs[3:]] == [0.5, 0.25]


def test_decode_needs_something_to_measure(tiny_converted):
    result = CliRunner().invoke(cli, ["bench", "decode", str(tiny_converted), "--no-resident"])
    assert result.exit_code != 0 and "nothing to measure" in result.output


def test_kernels_json_is_the_kernel_bench_result(monkeypatch):
    from mixtral_offload.quant import bench as quant_bench

    calls = []
    monkeypatch.setattr(quant_bench, "run_kernel_bench", lambda **kw: calls.append(kw) or {"results": [], "kw": 1})
    result = CliRunner().invoke(cli, ["bench", "kernels", "--json", "-t", "2", "--bits", "4", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"results": [], "kw": 1}
    assert calls[0]["threads"] == (2,) and calls[0]["bits"] == (4,) and calls[0]["repeats"] == 2


def test_decode_json_from_a_real_child(tiny_converted):
    result = CliRunner().invoke(cli, ["bench", "decode", str(tiny_converted), "--no-resident", "--experts-fraction",
                                      "0.5", "--repeats", "1", "--decode-tokens", "4", "--prompt-tokens", "16",
                                      "--decode-prompt-tokens", "4", "--bandwidth-gbs", "10", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bandwidth_gbs"] == 10 and report["machine"]["cpus"] >= 1
    (row,) = report["results"]
    assert row["exit_code"] == 0, row.get("error")
    assert row["label"] == "50% of experts" and row["experts_fraction"] == 0.5
    assert row["decode_tps"] > 0 and row["prompt_tps"] > 0 and len(row["decode_tps_runs"]) == 1
    assert row["peak_rss"] > 0 and row["peak_rss_hwm"] > 0 and row["budget"] > 0
    assert row["slots"] == row["total_experts"] // 2  # 2 layers x 4 experts: 4 slots
    assert 0 <= row["hit_rate"] <= 1 and row["cache_bytes_per_token"] >= 0
    assert row["floor_tps"] == pytest.approx(10e9 / row["active_bytes_per_token"])


def test_kernel_bench_result_has_the_documented_shape(monkeypatch):
    """A real (small) run: one row per kernel, format, activations mode, thread count and token count."""
    from mixtral_offload.quant import bench as quant_bench

    monkeypatch.setattr(quant_bench, "_BANDWIDTH_BYTES", 64 << 20)
    monkeypatch.setattr(quant_bench, "ROTATION_BYTES", 4 << 20)
    result = quant_bench.run_kernel_bench(threads=(1,), bits=(4, 8), repeats=3, matrix_shapes=((256, 512),),
                                          expert_shapes=((256, 384),))
    assert result["bandwidth_gbs"] > 0 and set(result["compile_s"]) >= {"int4 matvec", "int4 matvec int8-x"}
    rows = result["results"]
    keys = {"kernel", "bits", "shape", "threads", "tokens", "activations", "ms", "gbs", "ratio"}
    assert all(set(row) == keys for row in rows)
    assert {(r["kernel"], r["activations"]) for r in rows if r["shape"] == [256, 512]} == {
        ("int4 g64 matvec", "float32"), ("int4 g64 matvec int8-x", "int8"),
        ("int8 g64 matvec", "float32"), ("int8 g64 matvec int8-x", "int8"),
        ("torch float32 dense", "float32"), ("torch bfloat16 dense", "bfloat16")}
    assert {r["bits"] for r in rows if r["kernel"].startswith("torch")} == {16, 32}
    assert sum(r["kernel"].endswith("expert int8-x") for r in rows) == 2
    for row in rows:
        assert row["ms"] > 0 and row["ratio"] == pytest.approx(row["gbs"] / result["bandwidth_gbs"], rel=0.01, abs=1e-3)
