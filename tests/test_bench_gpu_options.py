"""The bench's GPU options, checked on the CPU: one fleet worker per GPU (``--gpus``), the
memory check, the scaling figure, tensor parallelism reaching the engine's arguments, text
prompts from the committed text model, and ``meta.git`` naming only this project's commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.config import BenchConfig, EngineConfig, WorkloadConfig
from bench.modes.fleet import check_gpu_memory, fleet_workers
from bench.report import add_ratios, targets
from bench.runner import GIT_COMMIT_ENV, REPO_ROOT, project_commit
from bench.workload import make_workload

TEXT_MODEL = REPO_ROOT / "bench" / "gpu" / "llama-2-7b-text"


def _cfg(**kw: Any) -> BenchConfig:
    engine = EngineConfig(**{"model": "m", "gpu_memory_utilization": 0.88,
                             **kw.pop("engine", {})})
    return BenchConfig(engine=engine, model_path="/models/m", **kw)


def test_each_listed_gpu_gets_one_worker_that_sees_only_it(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    ws = fleet_workers(_cfg(gpus=["1", "0"], workers=5), "fleet", tmp_path, "redis://x:1")
    assert [w.consumer for w in ws] == ["fleet-w1", "fleet-w2"]  # --gpus overrides --workers
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in ws] == ["1", "0"]
    for w in ws:
        assert w.env["SLOTFILL_ADMISSION"] == "engine"
        assert w.env["SLOTFILL_MODEL"] == "/models/m"
        assert w.env["SLOTFILL_GPU_MEMORY_UTILIZATION"] == "0.88"
    pairs = fleet_workers(_cfg(gpus=["0+1", "2+3"], engine={"tensor_parallel_size": 2}),
                          "fleet_fixed", tmp_path, "redis://x:1")
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in pairs] == ["0,1", "2,3"]
    assert {w.env["SLOTFILL_TENSOR_PARALLEL_SIZE"] for w in pairs} == {"2"}
    assert {w.env["SLOTFILL_EXECUTOR"] for w in pairs} == {"mp"}


def test_without_gpus_every_worker_sees_what_the_bench_sees(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    ws = fleet_workers(_cfg(workers=3), "fleet_fixed", tmp_path, "redis://x:1")
    assert len(ws) == 3
    assert {w.env["CUDA_VISIBLE_DEVICES"] for w in ws} == {"3"}
    assert {w.env["SLOTFILL_ADMISSION"] for w in ws} == {"fixed"}
    assert "SLOTFILL_EXECUTOR" not in ws[0].env
    assert ws[0].env["SLOTFILL_TENSOR_PARALLEL_SIZE"] == "1"


def test_memory_check_counts_engines_per_gpu() -> None:
    with pytest.raises(ValueError, match="2 engines"):
        check_gpu_memory(_cfg(workers=2))  # both on the bench's one GPU
    check_gpu_memory(_cfg(gpus=["0", "1"]))  # one each: 0.88 of each
    with pytest.raises(ValueError, match="2 engines"):
        check_gpu_memory(_cfg(gpus=["0", "0+1"]))  # GPU 0 twice
    check_gpu_memory(_cfg(workers=2, engine={"gpu_memory_utilization": 0.45}))


def test_scaling_is_fleet_over_workers_times_offline_with_gpus_only() -> None:
    def results(gpus: list[str]) -> dict[str, Any]:
        return {"config": {"gpus": gpus}, "meta": {"gpu": "H200"}, "modes": {
            "offline": {"output_tok_s": 100.0},
            "fleet": {"output_tok_s": 196.0, "workers": {"fleet-w1": {}, "fleet-w2": {}}}}}

    per_gpu = results(["0", "1"])
    add_ratios(per_gpu)
    assert per_gpu["modes"]["fleet"]["scaling"] == pytest.approx(0.98)
    assert targets(per_gpu)["fleet scaling: out tok/s / (2 x offline)"]["met"] is True
    assert "scaling_vs_split" not in per_gpu["modes"]["fleet"]
    split = results(["0", "1"])  # two engines, each alone over its half: a longer tail each
    split["modes"]["offline_split"] = {"output_tok_s": 190.0}
    add_ratios(split)
    assert split["modes"]["fleet"]["scaling_vs_split"] == pytest.approx(196 / 190)
    assert "scaling_vs_split" not in split["modes"]["offline_split"]
    got = targets(split)["fleet: out tok/s / offline_split (one engine per GPU, each its share)"]
    assert got["met"] is True
    shared = results([])  # both workers on one GPU: no scaling to speak of
    add_ratios(shared)
    assert "scaling" not in shared["modes"]["fleet"]


@pytest.mark.engine  # imports vLLM (and torch) into the test process: ~10 s of CPU
def test_tensor_parallel_reaches_the_engine_arguments(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bench setting -> worker environment -> WorkerSettings -> vLLM's AsyncEngineArgs (the
    engine itself is not started: two GPUs are not here)."""
    pytest.importorskip("vllm")
    from vllm.v1.engine.async_llm import AsyncLLM

    from worker.engines.vllm import VllmEngine
    from worker.settings import WorkerSettings

    eng = EngineConfig(tensor_parallel_size=2)
    assert eng.engine_kwargs("m")["tensor_parallel_size"] == 2
    assert eng.engine_kwargs("m")["distributed_executor_backend"] == "mp"
    assert "distributed_executor_backend" not in EngineConfig().engine_kwargs("m")
    (w,) = fleet_workers(_cfg(workers=1, engine={"tensor_parallel_size": 2}), "fleet",
                         tmp_path, "redis://x:1")
    for k, v in w.env.items():
        if k.startswith("SLOTFILL_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = WorkerSettings()
    seen: list[Any] = []

    class Stop(Exception):
        pass

    def capture(args: Any, **_: Any) -> Any:
        seen.append(args)
        raise Stop

    monkeypatch.setattr(AsyncLLM, "from_engine_args", capture)
    with pytest.raises(Stop):
        VllmEngine(settings, str(TEXT_MODEL))
    assert seen[0].tensor_parallel_size == 2
    assert seen[0].distributed_executor_backend == "mp"


def test_text_prompts_are_seeded_corpus_text_of_about_the_asked_length() -> None:
    pytest.importorskip("tokenizers")
    wl = WorkloadConfig(requests=200, prompt_tokens=256, min_output=32, max_output=512,
                        seed=0, text=True)
    reqs = make_workload(wl, 32000, str(TEXT_MODEL))
    again = make_workload(wl, 32000, str(TEXT_MODEL))
    other = make_workload(WorkloadConfig(**{**vars(wl), "seed": 1}), 32000, str(TEXT_MODEL))
    assert reqs == again and [q.prompt for q in reqs] != [q.prompt for q in other]
    ids = make_workload(WorkloadConfig(**{**vars(wl), "text": False}), 32000)
    assert [q.max_tokens for q in reqs] == [q.max_tokens for q in ids]  # same lengths drawn
    assert all(isinstance(q.prompt, str) and q.prompt.strip() for q in reqs)
    counts = [q.n_prompt for q in reqs]
    assert all(250 <= n <= 262 for n in counts), (min(counts), max(counts))
    assert len({q.prompt for q in reqs}) == len(reqs)


def test_text_model_is_llama_2_7b_shaped_with_a_32k_tokenizer() -> None:
    """The committed files, read with the tokenizers library (transformers imports torch:
    ~5 s here); the load through transformers, as vLLM does it, is the engine test below."""
    tokenizers = pytest.importorskip("tokenizers")
    cfg = json.loads((TEXT_MODEL / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"], cfg["intermediate_size"],
            cfg["max_position_embeddings"]) == (32000, 4096, 32, 32, 11008, 4096)
    tok_cfg = json.loads((TEXT_MODEL / "tokenizer_config.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(TEXT_MODEL / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 32000
    assert (tok.token_to_id(tok_cfg["bos_token"]), tok.token_to_id(tok_cfg["eos_token"]),
            cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2, 1, 2)
    ids = tok.encode("The worker pulls jobs from Redis.").ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == (
        "The worker pulls jobs from Redis.")


@pytest.mark.engine  # transformers imports torch, which the engine tests' process has
def test_transformers_loads_the_text_tokenizer_as_vllm_does() -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TEXT_MODEL))
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok.encode("The worker pulls jobs from Redis.")
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == (
        "The worker pulls jobs from Redis.")


def test_meta_git_names_this_project_or_nothing(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert (project_commit() or "").removesuffix("+dirty") == head
    # A copy of the tree inside another repository (as on a device): not our commit.
    other = tmp_path / "meta"
    tree = other / "checkout"
    (tree / "bench").mkdir(parents=True)
    (tree / "bench" / "runner.py").write_text("# copied\n")
    for args in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                                  "--allow-empty", "-m", "meta"]):
        subprocess.run(["git", *args], cwd=other, check=True)
    assert project_commit(tree) is None
    # The other repository's own top level, without our files: not ours either.
    assert project_commit(other) is None
    assert project_commit(tmp_path / "nowhere") is None
    monkeypatch.setenv(GIT_COMMIT_ENV, "abc1234")
    assert project_commit(tree) == "abc1234"


def test_cli_refuses_text_without_a_tokenizer(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--text", "--skip-tokenizer-init",
                           "--modes", "offline", "--results-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--text needs the tokenizer" in proc.stdout + proc.stderr


def test_session_stages_map_to_bench_runs_on_their_gpus(tmp_path: Path) -> None:
    """bench/gpu/session.sh's dry run: each stage's GPUs and flags (run together, so the
    order of the lines is free)."""
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "DRY_RUN": "1"}
    proc = subprocess.run(["bash", "bench/gpu/session.sh", "text", "two-gpu-mixed@2,3", "tp2"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split("]")[0][1:]: ln for ln in proc.stdout.splitlines()}
    assert "CUDA_VISIBLE_DEVICES=0 " in lines["text"] and "--text" in lines["text"]
    assert "--modes offline,slotfill,stream@50" in lines["text"]
    mixed = lines["two-gpu-mixed"]
    assert "CUDA_VISIBLE_DEVICES=2,3 " in mixed and "--gpus 2,3" in mixed
    assert "--long-share 0.15 --long-prompt-tokens 1500" in mixed
    assert "--modes offline,offline_split,fleet_fixed,fleet_adaptive" in mixed
    assert "CUDA_VISIBLE_DEVICES=0,1 " in lines["tp2"]
    assert "--tensor-parallel-size 2" in lines["tp2"]
    bad = subprocess.run(["bash", "bench/gpu/session.sh", "nope"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown stage nope" in bad.stdout
