"""Transformers + peft engine: runs the model in this process, one request at a time.

The fallback for machines where vLLM cannot run (``--engine hf``) and the reference that
vLLM's answers are checked against. Requests are served one after another under a lock
(two CPU cores gain nothing from interleaving them); adapters are peft adapters on one
``PeftModel``, switched per request.
"""

from __future__ import annotations

import threading

from pathlib import Path
from typing import Iterator

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .engine import Adapter, Chunk, EngineError, Sampling
from .penalties import FrequencyPenalty

class HFEngine:
    def __init__(self, model_path: str | Path, context_tokens: int, dtype: torch.dtype | None = None):
        # None: the machine's format (assistant.precision): bfloat16 where the CPU computes it
        # natively (~20% faster, half the memory), float32 where bf16 would run 50x slower.
        if dtype is None:
            from .precision import machine_format

            dtype = machine_format().torch_dtype()
        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.model.eval()
        self.context_tokens = min(context_tokens, self._model_max_tokens())
        self._lock = threading.Lock()
        self._adapters: dict[str, Adapter] = {}

    def _model_max_tokens(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def _prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        enc = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]  # (1, prompt_len)

    def count_tokens(self, messages: list[dict]) -> int:
        return int(self._prompt_ids(messages).shape[1])

    # -- adapters ------------------------------------------------------------------

    def load_adapter(self, adapter: Adapter) -> None:
        from peft import PeftModel

        with self._lock:
            if adapter.name in self._adapters:
                return  # names are immutable identities: same name, same weights
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(adapter.path, adapter_name=adapter.name)
                else:
                    self.model = PeftModel.from_pretrained(
                        self.model, adapter.path, adapter_name=adapter.name
                    )
                self.model.eval()
            except Exception as e:  # peft raises many kinds; the caller needs one
                raise EngineError(f"Could not load adapter {adapter.name}: {e}") from e
            self._adapters[adapter.name] = adapter

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self._adapters:
                self.model.delete_adapter(name)
                del self._adapters[name]

    # -- generation ----------------------------------------------------------------

    def stream(
        self, messages: list[dict], sampling: Sampling, adapter: Adapter | None = None
    ) -> Iterator[Chunk]:
        if adapter is not None and adapter.name not in self._adapters:
            raise EngineError(f"Adapter {adapter.name} is not loaded.")
        input_ids = self._prompt_ids(messages)
        max_new = min(sampling.max_new_tokens, self.context_tokens - input_ids.shape[1])
        if max_new <= 0:
            raise EngineError("The prompt fills the whole context; nothing is left for an answer.")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new,
            streamer=streamer,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.frequency_penalty:
            kwargs["logits_processor"] = LogitsProcessorList([FrequencyPenalty(sampling.frequency_penalty, input_ids.shape[1])])
        cancelled = threading.Event()
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancelled)])
        result: dict = {}

        def run() -> None:
            try:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                with torch.inference_mode():
                    if adapter is None and self._adapters:
                        with self.model.disable_adapter():
                            out = self.model.generate(**kwargs)
                    else:
                        if adapter is not None:
                            self.model.set_adapter(adapter.name)
                        out = self.model.generate(**kwargs)
                result["tokens"] = int(out.shape[1] - input_ids.shape[1])
                last = int(out[0, -1])
                result["finish"] = "stop" if last == self.tokenizer.eos_token_id else "length"
            except Exception as e:  # reported to the consumer below
                result["error"] = e
                streamer.end()

        with self._lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    if piece:
                        yield Chunk(piece)
            finally:
                # A reader that went away (closed tab) stops the generation too, and
                # the next request waits until the model is free.
                cancelled.set()
                worker.join()
        if "error" in result:
            raise EngineError(f"Generation failed: {result['error']}") from result["error"]
        yield Chunk("", finish_reason=result["finish"], completion_tokens=result["tokens"])

    def close(self) -> None:
        pass




class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()
