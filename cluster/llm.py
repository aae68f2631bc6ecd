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
import logging
import os
import pathlib
import time
from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer
from tqdm.auto import tqdm

from scheduler import validation
from scheduler.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from scheduler.checks import check_bool, check_int, check_str
from scheduler.config import EngineConfig
from scheduler.errors import (
    ConfigError,
    ConfigTypeError,
    InvalidRequestError,
    PromptError,
    PromptTooLongError,
    SamplingParamsError,
    SamplingParamsTypeError,
    reject_unknown,
    show,
)
from scheduler.pipelined import make_engine
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.streaming import OutputDeltas

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096
"""`max_model_len=None` means min(the model's max_position_embeddings, this)."""

PromptType = str | list[int] | dict

# LLM(...) keywords beyond the explicit ones: the EngineConfig fields (model is positional)
CONFIG_KEYWORDS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "model")


class LLM:
    """Generate with a Hugging Face model folder sharded T x P x D ways (vLLM's `LLM` API)."""

    def __init__(self, model: str, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 data_parallel_size: int = 1, dtype: str = "float32", max_model_len: int | None = None,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048, kv_cache_memory: int | None = None,
                 num_kv_blocks: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 seed: int = 0, address: str | None = None, quantization: str | None = None, preflight: bool = True,
                 placement=None, **kwargs) -> None:
        """`preflight`: on a multi-node cluster, check every node first (`cluster.preflight`).
        `quantization`: int8 / int4[-gN] / w8a8, each rank quantizing its own slices at load (a
        `shardline quantize` folder names its own).
        `placement`: a `cluster.ray_workers.ExistingGroup` to put the workers in (a Serve replica's group).

        Every other keyword is an `EngineConfig` field (e.g. `max_logprobs`, `cpus_per_worker`,
        `step_timeout_s`); anything else is an `UnknownArgumentError` naming the closest valid name."""
        # 1. the arguments: unknown keywords and wrong types fail before anything is read or started
        reject_unknown(kwargs, CONFIG_KEYWORDS + ("address", "preflight", "placement"), "LLM()")
        check_bool("preflight", preflight, type_err=ConfigTypeError)
        if not isinstance(model, (str, os.PathLike)):
            raise ConfigTypeError(f"model={show(model)} must be a path (str) to a Hugging Face model folder, "
                                  f"not {type(model).__name__}", "model", model)
        if address is not None and not isinstance(address, str):
            raise ConfigTypeError(f"address={show(address)} must be a str such as '127.0.0.1:6379' or None",
                                  "address", address)
        path = pathlib.Path(model).expanduser().resolve()
        config = EngineConfig(
            model=str(path), tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_size=data_parallel_size, dtype=dtype, max_model_len=max_model_len, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
            num_kv_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching, seed=seed,
            quantization=quantization, **kwargs)
        # 2. the model folder
        hf_config = _read_json(path, "config.json", required=True)
        if quantization is None and (hf_config.get("quantization_config") or {}).get("method"):
            # a `shardline quantize` folder names its own method
            config = dataclasses.replace(config, quantization=hf_config["quantization_config"]["method"])
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no tokenizer.json; Shardline needs a fast tokenizer file")
        limit = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or DEFAULT_MAX_MODEL_LEN
        if max_model_len is None:
            max_model_len = min(int(limit), DEFAULT_MAX_MODEL_LEN)
        elif max_model_len > limit:
            raise ConfigError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}",
                              "max_model_len", max_model_len)
        self.config = dataclasses.replace(config, max_model_len=max_model_len)
        if self.config.quantization is not None:   # int4 groups vs every rank's slices, before any worker
            from sharding.quant.validate import check_quantization
            check_quantization(self.config)
        # 3. tokenizer and EOS ids (as HF generate: generation_config.json, else config.json)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.eos_token_ids = _eos_token_ids(path, hf_config)
        self._hf_tokenizer = None
        # 4. the ranks, then the engine
        self.executor = self._make_executor(self.config, address, preflight, placement)
        if getattr(self.executor, "plan", None) is not None:   # the layout and its imbalance, in the log
            logger.info("shard plan:\n%s", self.executor.plan.describe())
        try:
            self.engine = make_engine(self.config, self.executor, self.tokenizer, self.eos_token_ids, max_model_len)
        except BaseException:
            self.executor.shutdown()
            raise
        self._ids = itertools.count()

    @staticmethod
    def _make_executor(config: EngineConfig, address: str | None, preflight: bool = True, placement=None):
        """The one place that picks where the ranks run (on a multi-node cluster, after the pre-flight check;
        `placement`: a `ray_workers.ExistingGroup`, whose owner already checked its nodes)."""
        if config.world_size * config.data_parallel_size == 1 and address is None and placement is None:
            from cluster.local_executor import LocalExecutor
            return LocalExecutor(config)
        from cluster.preflight import preflight_if_multinode
        from cluster.ray_executor import RayExecutor
        joined = preflight_if_multinode(config, address) if preflight and placement is None else False
        try:
            executor = RayExecutor(config, address=address, placement=placement)
        except BaseException:
            if joined:   # the pre-flight connected this process; nobody else will disconnect it
                import ray
                ray.shutdown()
            raise
        executor.started_ray = executor.started_ray or joined   # the pre-flight's connection is the engine's
        return executor

    # -- generation ----------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order.

        prompts: a str, a vLLM-style {"prompt_token_ids": [...]} dict (optionally with "prompt"
        text), a list of token ids inside a list, or a list of those. sampling_params: a
        SamplingParams or a dict of its fields, one for all or one per prompt.

        Everything is validated before anything runs (scheduler.validation): a bad prompt or
        parameter raises an InvalidRequestError naming it (and `prompts[i]` for a batch) and
        leaves the engine as it was. Only a prompt that is too long (longer than max_model_len,
        no room for an output token, or larger than the KV cache) does not stop the others: they
        all complete, then `PromptTooLongError` is raised naming every rejected prompt's index and
        lengths. The error carries `.outputs` (the RequestOutputs in input order, None for
        rejected prompts) and `.rejected` ({index: message}), so no finished work is lost.
        """
        check_bool("use_tqdm", use_tqdm)
        prepared = validation.split_prompts(prompts)
        params = validation.params_per_prompt(sampling_params, len(prepared), self.engine.limits)
        return self._generate(prepared, params, use_tqdm)

    def _generate(self, prepared: list[tuple[str | None, list | None]], params: list[SamplingParams],
                  use_tqdm: bool) -> list[RequestOutput]:
        """Validate every (text, ids) prompt, admit the valid ones at once, run them (see `generate`)."""
        batch = f"g{next(self._ids)}"
        requests, rejected = [], {}
        for i, ((text, ids), p) in enumerate(zip(prepared, params, strict=True)):
            try:
                prompt = text if ids is None else ids
                requests.append(self.engine.make_request(f"{batch}-{i}", prompt, p, prompt_text=text))
            except PromptTooLongError as e:
                rejected[i] = str(e)
            except InvalidRequestError as e:
                raise e.at(f"prompts[{i}]") if len(prepared) > 1 else e from None
        self.engine.add_requests(requests)          # all or nothing
        done = self._run([r.request_id for r in requests], use_tqdm)
        outputs = [done.get(f"{batch}-{i}") for i in range(len(prepared))]
        if rejected:
            lines = "; ".join(f"prompt {i}: {msg}" for i, msg in rejected.items())
            first = next(iter(rejected))
            err = PromptTooLongError(f"{len(rejected)} of {len(prepared)} prompts rejected ({lines}); the other "
                                     f"{len(prepared) - len(rejected)} completed and are in this error's .outputs",
                                     param="prompt", value=first)
            err.outputs, err.rejected = outputs, rejected
            raise err
        return outputs

    def generate_stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                        request_id: str | None = None) -> Iterator[RequestOutput]:
        """Yield one prompt's outputs as they are produced: each a delta (new text, token ids, logprobs).

        The last one has `finished=True` and a `finish_reason`. Closing the generator early (break)
        aborts the request and frees its KV blocks. Over the same `LLMEngine.step()` loop as
        `generate`; the serving path (`scheduler.async_engine`) yields the same deltas.
        """
        limits = self.engine.limits
        params = validation.check_sampling_params(sampling_params if sampling_params is not None else SamplingParams(),
                                                  limits)
        if request_id is not None:
            check_str("request_id", request_id)
        text, ids = validation.split_prompt(prompt)   # a str or a {"prompt_token_ids": [...]} dict
        rid = request_id or f"s{next(self._ids)}"
        self.engine.add_requests([self.engine.make_request(rid, text if ids is None else ids, params,
                                                           prompt_text=text)])
        deltas, finished = OutputDeltas(), False
        try:
            while not finished:
                for o in self.engine.step():
                    if o.request_id == rid:
                        finished = o.finished
                        yield deltas.delta(o)
        finally:
            if not finished:   # freed at the start of the next step
                self._abort([rid])

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or a list of them.

        The model's chat template renders the text, which is tokenized without adding special
        tokens again (the template writes them), as vLLM does. Messages are checked first (a
        missing role is an error naming the message, not a template error).
        """
        convs = validation.check_conversations(messages)
        check_bool("add_generation_prompt", add_generation_prompt)
        if chat_template is not None:
            check_str("chat_template", chat_template)
        params = validation.params_per_prompt(sampling_params, len(convs), self.engine.limits)
        tok = self.get_tokenizer()
        prompts = []
        for conv in convs:
            try:
                text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template)
            except Exception as e:   # jinja errors: name what the template could not render
                raise PromptError(f"the chat template could not render messages={show(conv)}: "
                                  f"{type(e).__name__}: {e}", "messages", conv) from e
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            prompts.append((text, ids))
        return self._generate(prompts, params, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search with HF `generate(num_beams=k, do_sample=False)` semantics (see scheduler.beam_search)."""
        if not isinstance(params, BeamSearchParams):
            raise SamplingParamsTypeError(f"params={show(params)} must be a BeamSearchParams, "
                                          f"not {type(params).__name__}", "params", params)
        limits = self.engine.limits
        check_int("beam_width", params.beam_width, lo=1, hi=limits.max_n,
                  hint=f"in [1, {limits.max_n}] (max_n of this engine)", err=SamplingParamsError)
        k = params.logprobs_per_step(len(self.eos_token_ids))
        if k > min(limits.max_logprobs, limits.vocab_size):
            raise SamplingParamsError(f"beam_width={params.beam_width} needs {k} top logprobs per step but this "
                                      f"engine allows max_logprobs={limits.max_logprobs}; lower beam_width or "
                                      "raise LLM(max_logprobs=...)", "beam_width", params.beam_width)
        ids = []
        for i, p in enumerate(validation.as_prompt_list(prompts)):
            try:
                ids.append(validation.prompt_token_ids(p, self.tokenizer, limits)[1])
            except InvalidRequestError as e:
                raise e.at(f"prompts[{i}]") from None

        def run(batch):
            reqs = [self.engine.make_request(f"b{next(self._ids)}", tids, sp) for tids, sp in batch]
            self.engine.add_requests(reqs)
            done = self._run([r.request_id for r in reqs], use_tqdm=False)
            return [done[r.request_id] for r in reqs]

        return beam_search(run, ids, params, self.eos_token_ids, max_model_len=self.engine.max_seq_len,
                           decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=True))

    # -- plumbing ------------------------------------------------------------------------

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


def _read_json(path: pathlib.Path, name: str, required: bool = False) -> dict:
    f = path / name
    if not f.is_file():
        if required:
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: {f} does not exist")
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f} is not valid JSON ({e}); fix or re-create the model folder", "model", str(f)) from None


def _eos_token_ids(path: pathlib.Path, hf_config: dict) -> list[int]:
    for source in (_read_json(path, "generation_config.json"), hf_config):
        eos = source.get("eos_token_id")
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []
