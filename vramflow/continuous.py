"""Answer one engine call's pages with transformers' continuous batching (opt-in).

transformers 5.x generates for many prompts over a paged KV cache: requests join and leave the
running batch token by token, without padding (`init_continuous_batching`, configured by
`ContinuousBatchingConfig`, in `transformers/generation/continuous_batching`). Left alone it
sizes that cache from the device's free memory (0.9 of it on CUDA, 0.6 of the host's on a CPU);
here the cache holds what the call needs, every page's prompt plus its new tokens, and never
more tokens than the holder's grant leaves room for, so holders sharing a card stay within their
grants. (The grant does not count the attention mask of a forward step, MAX_STEP_TOKENS by the
cached tokens, which sdpa and eager attention need.)

Where transformers cannot run a model this way (its attention layers do not take the paged cache,
an encoder-decoder, an attention implementation or layer type without a paged form) the engine
keeps static batches and says why once in the log. A continuous call that fails, out of memory
included, is recorded and its pages go to the static path (vramflow.inference.run_batch), which
splits on out-of-memory as always.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vramflow import gpu, models
from vramflow.errors import InferenceTimeoutError
from vramflow.faults import OomInjector
from vramflow.inference import (
    BatchLimit,
    BatchOutcome,
    CallRecord,
    GenerationSettings,
    PageInput,
    call_model,
    run_batch,
)
from vramflow.models import Generation, LoadedModel

log = logging.getLogger(__name__)

# Tokens per cache page. transformers' default, 256, would give a two-line page a whole 256-token
# page of cache per layer; 64 wastes little on short pages and still reads in long runs.
PAGE_TOKENS = 64
# Most tokens one forward step carries (prompts are prefilled in chunks of up to this many).
MAX_STEP_TOKENS = 4096
# Attention implementations transformers' paged cache has a form for ("flash..." as well).
PAGED_ATTENTION = ("sdpa", "eager", "paged|eager")
PAGED_LAYER_TYPES = ("full_attention", "sliding_attention")
# How often the caller looks at the deadline while results are outstanding.
POLL_SECONDS = 0.5

_refused: dict[tuple[str, str], str] = {}  # (model, device) → why it takes static batches
_refused_lock = threading.Lock()


@dataclass(frozen=True)
class CachePlan:
    """The paged cache of one call: pages of PAGE_TOKENS tokens, and tokens per forward step."""

    num_blocks: int
    max_batch_tokens: int


def runner(
    wanted: bool, loaded: LoadedModel, device: str, token_cap: int | None
) -> Callable[..., BatchOutcome] | None:
    """`run_continuous` for a call of `loaded`'s pages (with `run_batch`'s arguments), its cache
    within `token_cap` tokens, when `wanted` and transformers runs the model that way; None
    (static calls) otherwise."""
    if wanted and refusal(loaded, device) is None:
        return functools.partial(run_continuous, token_cap=token_cap)
    return None


def refusal(loaded: LoadedModel, device: str) -> str | None:
    """Why `loaded` cannot take continuous batching on `device`, or None when it can. Said once
    in the log per model and device."""
    key = (loaded.spec, device)
    with _refused_lock:
        if key in _refused:
            return _refused[key]
    reason = unsupported(loaded.model)
    if reason is not None:
        refuse(loaded.spec, device, reason)
    return reason


def refuse(model: str, device: str, reason: str) -> None:
    """Take static batches for `model` on `device` from now on in this process."""
    with _refused_lock:
        _refused[(model, device)] = reason
    log.warning(
        "continuous batching is off for %s on %s: %s; static batches instead", model, device, reason
    )


def forget_refusals() -> None:
    """Try continuous batching again for every model (tests; a process that changed models)."""
    with _refused_lock:
        _refused.clear()


def unsupported(model: Any) -> str | None:
    """What keeps transformers' continuous batching from running `model`, from what its source
    requires: the mixin's entry point, a decoder-only model whose layers pass the paged cache to
    the attention functions (`_supports_attention_backend`), an attention implementation with a
    paged form, and full or sliding attention layers only."""
    if not hasattr(model, "init_continuous_batching"):
        return "this transformers has no continuous batching (transformers 5.x has)"
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    backend = getattr(type(model), "is_backend_compatible", None)
    if backend is None or not backend():
        return f"{type(model).__name__} does not pass the paged cache to its attention layers"
    attention = str(getattr(config, "_attn_implementation", None))
    if attention not in PAGED_ATTENTION and "flash" not in attention:
        return f"attention implementation {attention!r} has no paged form"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    unknown = set(getattr(text, "layer_types", None) or []) - set(PAGED_LAYER_TYPES)
    if unknown:
        return f"layer types {sorted(unknown)} have no paged cache"
    return None


def cache_plan(lengths: list[int], max_new_tokens: int, token_cap: int | None) -> CachePlan:
    """A cache for prompts of `lengths` tokens, each generating `max_new_tokens`: every request's
    pages at once, or as many as `token_cap` tokens allow (requests then wait their turn), but
    never less than the largest request needs alone."""
    per_request = [-(-(length + max_new_tokens) // PAGE_TOKENS) for length in lengths] or [1]
    blocks = sum(per_request)
    if token_cap is not None:
        blocks = max(max(per_request), min(blocks, token_cap // PAGE_TOKENS))
    return CachePlan(blocks, min(MAX_STEP_TOKENS, blocks * PAGE_TOKENS))


def generate_continuous(
    loaded: LoadedModel,
    prompt: str,
    texts: list[str],
    *,
    device: str,
    max_new_tokens: int,
    max_input_tokens: int,
    timeout_s: float,
    token_cap: int | None = None,
) -> list[Generation]:
    """Greedy answers for `texts`, as `models.generate_batch` gives them, through continuous
    batching; the model must already be on `device`. Raises `torch.OutOfMemoryError` when the
    device ran out of memory, `InferenceTimeoutError` past `timeout_s`."""
    prompts, truncated = models.build_prompts(loaded, prompt, texts, max_input_tokens)
    tok = loaded.tokenizer
    inputs = [tok(text, add_special_tokens=False)["input_ids"] for text in prompts]
    plan = cache_plan([len(ids) for ids in inputs], max_new_tokens, token_cap)
    outputs = _generate(loaded.model, inputs, max_new_tokens, plan, timeout_s)
    return [
        models.answer(loaded, new_ids, len(ids), cut)
        for new_ids, ids, cut in zip(outputs, inputs, truncated, strict=True)
    ]


def _generate(
    model: Any, inputs: list[list[int]], max_new_tokens: int, plan: CachePlan, timeout_s: float
) -> list[list[int]]:
    """Each input's generated ids, from a manager that lives for this call only: its cache
    leaves the device with it, before the weights do."""
    from transformers import ContinuousBatchingConfig

    generation = copy.deepcopy(model.generation_config)  # the static path's settings, greedy
    generation.update(do_sample=False, max_new_tokens=max_new_tokens)
    if generation.eos_token_id is None:
        generation.eos_token_id = -1  # as `generate` does: no end token, all new tokens
    config = ContinuousBatchingConfig(
        page_size=PAGE_TOKENS,
        num_blocks=plan.num_blocks,
        max_batch_tokens=plan.max_batch_tokens,
        max_requests_per_batch=len(inputs),
        max_memory_percent=1.0,  # sized above; this only checks that the cache fits what is free
    )
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=config
    )
    finished = False
    try:
        with torch.inference_mode():  # the generation thread takes the caller's mode
            manager.start()
        ids = manager.add_requests(inputs, max_new_tokens=max_new_tokens)
        results = _collect(manager, ids, time.monotonic() + timeout_s, timeout_s)
        finished = True
    finally:
        manager.stop(block=True, timeout=60, hard_stop=not finished)
        failure = _failure(manager, results if finished else {}, ids if finished else [])
        manager.destroy()
    if failure is not None:
        raise failure
    return [results[request].generated_tokens for request in ids]


def _collect(manager: Any, ids: list[str], deadline: float, timeout_s: float) -> dict[str, Any]:
    """Finished outputs by request id, until all are in, the loop has stopped, or the deadline."""
    results: dict[str, Any] = {}
    while len(results) < len(ids):
        left = deadline - time.monotonic()
        if left <= 0:
            raise InferenceTimeoutError(f"generation ran past the {timeout_s:g} s limit")
        output = manager.get_result(timeout=min(left, POLL_SECONDS))
        if output is None:
            if not manager.is_running():
                break
            continue
        if output.is_finished():
            results[output.request_id] = output
    return results


def _failure(manager: Any, results: dict[str, Any], ids: list[str]) -> Exception | None:
    """A fresh exception for what went wrong in the generation thread, or None: out of memory
    stays `torch.OutOfMemoryError`, so the caller classifies it as the static path's would. Only
    the message is kept: the original's traceback holds the failed step's tensors."""
    status = manager.background_thread_status
    fatal, status.fatal_error = status.fatal_error, None
    if fatal is not None:
        lines = str(fatal).strip().splitlines()
        message = f"{type(fatal).__name__}: {lines[0] if lines else ''}"
        # MemoryError: transformers found no room for the cache in the device's free memory.
        if isinstance(fatal, MemoryError) or gpu.is_oom(fatal):
            return torch.OutOfMemoryError(f"out of memory in continuous batching ({message})")
        return RuntimeError(f"continuous batching failed ({message})")
    errors = [results[i].error for i in ids if i in results and results[i].error]
    missing = [i for i in ids if i not in results]
    if not errors and not missing:
        return None
    message = errors[0] if errors else f"{len(missing)} requests never finished"
    if gpu.is_oom(RuntimeError(message)):
        return torch.OutOfMemoryError(f"out of memory in continuous batching ({message})")
    return RuntimeError(f"continuous batching failed ({message})")


def run_continuous(
    loaded: LoadedModel,
    pages: list[PageInput],
    cfg: GenerationSettings,
    *,
    token_cap: int | None = None,
    injector: OomInjector | None = None,
    on_call: Callable[[CallRecord], None] = lambda record: None,
    limit: BatchLimit | None = None,
) -> BatchOutcome:
    """`pages` in one continuous-batching call; if it fails (but for a timeout, which fails them
    as a static call's would), the same pages through static calls, which split on OOM. Every
    call goes to `on_call`. A failure other than out-of-memory turns continuous batching off
    for the model: it is taken as one transformers cannot run."""

    def generate(*args: Any, **kwargs: Any) -> list[Generation]:
        return generate_continuous(*args, **kwargs, token_cap=token_cap)

    record: CallRecord = call_model(loaded, pages, cfg, injector, generate=generate)
    record.batching = "continuous"
    outcome = BatchOutcome()
    if record.outcome in ("ok", "timeout"):
        on_call(record)
        for key in record.pages:
            if record.outcome == "ok":
                outcome.done[key] = (record.generations[key], record)
            else:
                outcome.failed[key] = record
        return outcome
    record.retried = True
    on_call(record)
    if record.outcome == "error":
        refuse(loaded.spec, cfg.device, f"it failed: {record.error_message}")
    else:
        log.warning("continuous batching ran out of memory on %d pages: static calls", len(pages))
    return run_batch(loaded, pages, cfg, injector=injector, on_call=on_call, limit=limit)
