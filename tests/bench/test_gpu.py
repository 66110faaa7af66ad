"""bench/gpu.py on CPU (--device cpu --quick): the GPU harness's own code path -- warm-up
call, timed call, FLOPs and MFU bookkeeping, the multi-process run -- without a GPU; and
its clear refusal when asked for a GPU there is none of."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.harness import ROOT, run_quick


@pytest.mark.torch
def test_the_gpu_benchmark_runs_quick_on_cpu(tmp_path: Path) -> None:
    report = run_quick("gpu.py", tmp_path / "gpu.json", "--device", "cpu", "--multi", "2",
                       timeout=120)  # fmt: skip
    assert report["complete"] is True
    assert report["device"]["kind"] == "cpu" and report["precision"] == "fp32"
    assert report["peakTflopsPerDevice"] is None and "6 * params" in report["flopsFormula"]
    [row] = report["results"]
    multi = report["multi"]
    for run, world in ((row, 1), (multi, 2)):
        assert run["preset"] == "tiny" and run["fit"] is True and run["worldSize"] == world
        assert run["steps"] == 3 and run["warmupSteps"] == 1
        assert run["tokens"] == run["steps"] * run["batchSize"] * run["seqLen"]
        assert run["tokensPerSecond"] > 0 and run["seconds"] > 0
        assert run["tokensPerSecond"] == pytest.approx(run["tokens"] / run["seconds"])
        assert run["modelTflopsPerSecond"] == pytest.approx(
            run["tokensPerSecond"] * run["flopsPerToken"] / 1e12
        )
        assert run["mfu"] is None  # no peak is known for a CPU
    assert multi["batchSize"] == 2 * row["batchSize"]  # each rank at the single batch
    assert multi["scalingEfficiency"] == pytest.approx(
        multi["tokensPerSecond"] / (2 * row["tokensPerSecond"])
    )


def test_the_gpu_benchmark_peak_table() -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    peak_tflops = module.peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == (989.4, "table: H100")
    assert peak_tflops("NVIDIA H100 PCIe", None) == (756.0, "table: H100 PCIe")
    assert peak_tflops("NVIDIA H200", None)[0] == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert peak_tflops("NVIDIA L4", None)[0] == 121.0
    assert peak_tflops("Some Future GPU", None) == (None, None)
    assert peak_tflops("Some Future GPU", 500.0) == (500.0, "--peak-tflops")


@pytest.mark.torch
def test_the_gpu_benchmark_refuses_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--out",
                           str(tmp_path / "gpu.json")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "gpu.json").exists()
