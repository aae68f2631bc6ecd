"""`LLM`: the offline client handle (vLLM's `LLM`), over the engine and an executor.

    with LLM("models/smollm2", tensor_parallel_size=2) as llm:
        outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0))

One rank and no `address` runs in this process (`LocalExecutor`); anything else runs on Ray
(`RayExecutor`), joining the cluster at `address` or starting a local one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import time
from collections.abc import Sequence

from tokenizers import Tokenizer
from tqdm.auto import tqdm

from scheduler.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine, PromptTooLongError
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams

DEFAULT_MAX_MODEL_LEN = 4096
"""`max_model_len=None` means min(the model's max_position_embeddings, this)."""

PromptType = str | list[int] | dict


class LLM:
    """Generate with a Hugging Face model folder sharded T x P x D ways (vLLM's `LLM` API)."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 data_parallel_size: int = 1, dtype: str = "float32", max_model_len: int | None = None,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048, kv_cache_memory: int | None = None,
                 num_kv_blocks: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 seed: int = 0, address: str | None = None, quantization: str | None = None,
                 **kwargs) -> None:
        # 1. the model folder
        path = pathlib.Path(model).expanduser().resolve()
        hf_config = _read_json(path, "config.json", required=True)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no tokenizer.json; Shardline needs a fast tokenizer file")
        limit = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or DEFAULT_MAX_MODEL_LEN
        if max_model_len is None:
            max_model_len = min(int(limit), DEFAULT_MAX_MODEL_LEN)
        elif max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
        if quantization is None:   # a `shardline quantize` folder names its own method
            quantization = (hf_config.get("quantization_config") or {}).get("method")
        # 2. the config (unknown keyword arguments go to EngineConfig fields, else to `extra`)
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        extra = {k: v for k, v in kwargs.items() if k not in fields}
        known = {k: v for k, v in kwargs.items() if k in fields}
        self.config = EngineConfig(
            model=str(path), tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_size=data_parallel_size, dtype=dtype, max_model_len=max_model_len, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
            num_kv_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching, seed=seed,
            quantization=quantization, extra=extra, **known)
        if self.config.quantization is not None:   # int4 groups vs every rank's slices, before any worker
            from sharding.quant.validate import check_quantization
            check_quantization(self.config)
        # 3. tokenizer and EOS ids (as HF generate: generation_config.json, else config.json)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.eos_token_ids = _eos_token_ids(path, hf_config)
        self._hf_tokenizer = None
        # 4. the ranks, then the engine
        self.executor = self._make_executor(self.config, address)
        try:
            self.engine = LLMEngine(self.config, self.executor, self.tokenizer, self.eos_token_ids, max_model_len)
        except BaseException:
            self.executor.shutdown()
            raise
        self._ids = itertools.count()

    @staticmethod
    def _make_executor(config: EngineConfig, address: str | None):
        """The one place that picks where the ranks run."""
        if config.world_size * config.data_parallel_size == 1 and address is None:
            from cluster.local_executor import LocalExecutor
            return LocalExecutor(config)
        from cluster.ray_executor import RayExecutor
        return RayExecutor(config, address=address)

    # -- generation ----------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order.

        prompts: a str, a list of str, a vLLM-style {"prompt_token_ids": [...]} dict (optionally
        with "prompt" text), or a list of those. sampling_params: one for all, or one per prompt.

        A prompt that cannot run (longer than max_model_len, no room for an output token, or
        larger than the KV cache) does not stop the others: they all complete, then
        `PromptTooLongError` is raised naming every rejected prompt's index and lengths. The
        error carries `.outputs` (the RequestOutputs in input order, None for rejected
        prompts) and `.rejected` ({index: message}), so no finished work is lost.
        """
        items = _normalize_prompts(prompts)
        params = self._params_per_prompt(sampling_params, len(items))
        batch = f"g{next(self._ids)}"
        rids, rejected = [], {}
        for i, ((text, ids), p) in enumerate(zip(items, params, strict=True)):
            rid = f"{batch}-{i}"
            try:
                self._add(rid, text, ids, p)
                rids.append(rid)
            except PromptTooLongError as e:
                rejected[i] = str(e)
            except BaseException:
                self._abort(rids)
                raise
        done = self._run(rids, use_tqdm)
        outputs = [done.get(f"{batch}-{i}") for i in range(len(items))]
        if rejected:
            lines = "; ".join(f"prompt {i}: {msg}" for i, msg in rejected.items())
            err = PromptTooLongError(f"{len(rejected)} of {len(items)} prompts rejected ({lines}); the other "
                                     f"{len(items) - len(rejected)} completed and are in this error's .outputs")
            err.outputs, err.rejected = outputs, rejected
            raise err
        return outputs

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or a list of them.

        The model's chat template renders the text, which is tokenized without adding special
        tokens again (the template writes them), as vLLM does.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = []
        for conv in convs:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search with HF `generate(num_beams=k, do_sample=False)` semantics (see scheduler.beam_search)."""
        items = _normalize_prompts(prompts)
        ids = [self._tokenize(text, tids) for text, tids in items]
        for p in ids:
            self.engine.check_prompt(p)

        def run(batch):
            rids = []
            for tids, sp in batch:
                rid = f"b{next(self._ids)}"
                self._add(rid, None, tids, sp)
                rids.append(rid)
            done = self._run(rids, use_tqdm=False)
            return [done[r] for r in rids]

        return beam_search(run, ids, params, self.eos_token_ids, max_model_len=self.engine.max_seq_len,
                           decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True))

    # -- plumbing ------------------------------------------------------------------------

    def _tokenize(self, text: str | None, ids: list[int] | None) -> list[int]:
        return list(ids) if ids is not None else self.tokenizer.encode(text).ids

    def _add(self, rid: str, text: str | None, ids: list[int] | None, params: SamplingParams) -> None:
        if ids is None:
            self.engine.add_request(rid, text, params)
        else:
            self.engine.add_request(rid, list(ids), params, prompt_text=text)

    def _run(self, rids: list[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        wanted, done = set(rids), {}
        bar = tqdm(total=len(rids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while len(done) < len(wanted):
                for o in self.engine.step():
                    if o.finished and o.request_id in wanted:
                        done[o.request_id] = o
                        out_tokens += sum(len(c.token_ids) for c in o.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"output {out_tokens / max(time.perf_counter() - start, 1e-9):.1f} tok/s")
        except BaseException:
            self._abort([r for r in rids if r not in done])
            raise
        finally:
            bar.close()
        return done

    def _abort(self, rids: list[str]) -> None:
        for r in rids:
            self.engine.abort_request(r)

    def _params_per_prompt(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling_params for {n} prompts; give one, or one per prompt")
        return params

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer (chat templates, decoding helpers)."""
        if self._hf_tokenizer is None:
            from transformers import AutoTokenizer
            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        return self._hf_tokenizer

    def shutdown(self) -> None:
        """Release the ranks (and Ray actors). Safe to call twice."""
        ex = getattr(self, "executor", None)
        if ex is not None:
            ex.shutdown()
            self.executor = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _normalize_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    """-> [(text or None, token ids or None)] for str / dict / list-of-either inputs."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a str, a {{'prompt_token_ids': [...]}} dict, or a list of those; "
                        f"got {type(prompts).__name__}")
    items = []
    for p in prompts:
        if isinstance(p, str):
            items.append((p, None))
        elif isinstance(p, dict) and "prompt_token_ids" in p:
            items.append((p.get("prompt"), [int(t) for t in p["prompt_token_ids"]]))
        elif isinstance(p, dict) and "prompt" in p:
            items.append((p["prompt"], None))
        else:
            raise TypeError(f"a prompt must be a str or a dict with 'prompt_token_ids' or 'prompt', got {p!r:.80}")
    return items


def _read_json(path: pathlib.Path, name: str, required: bool = False) -> dict:
    f = path / name
    if not f.is_file():
        if required:
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: {f} does not exist")
        return {}
    return json.loads(f.read_text())


def _eos_token_ids(path: pathlib.Path, hf_config: dict) -> list[int]:
    for source in (_read_json(path, "generation_config.json"), hf_config):
        eos = source.get("eos_token_id")
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []
