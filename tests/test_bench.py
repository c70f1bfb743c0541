"""`mixtral-offload bench`: option parsing, the kernel bench's wiring, and one real decode child (structure only)."""
import json

import pytest
from click.testing import CliRunner

from mixtral_offload import benchmark
from mixtral_offload.cli.main import cli
from mixtral_offload.offload.convert import convert


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
    result = CliRunner().invoke(cli, ["bench", "decode", "--experts-fraction", "0.5", "0.25", "--budget", "1GiB",
                                      "2GiB", str(tiny_converted), "--repeats", "1", "--json"])
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
