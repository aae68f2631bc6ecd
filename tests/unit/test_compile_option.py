"""`compile=True` at the edge: a typed config field, buckets that cover every batch, and a missing C++
compiler reported at load with what to install (no graph is compiled here: these tests are cheap)."""

from __future__ import annotations

import pytest
import torch

from cluster.llm import LLM
from scheduler.config import EngineConfig
from scheduler.errors import ConfigError, UnknownArgumentError
from sharding.compiled import CompilerMissingError, bucket_for, check_compiler, decode_buckets


def test_compile_is_a_bool_engine_option():
    assert EngineConfig(model="m").compile is False and EngineConfig(model="m", compile=True).compile is True
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError) as e:
            EngineConfig(model="m", compile=bad)
        assert e.value.param == "compile"
    with pytest.raises(UnknownArgumentError, match="did you mean 'compile'"):
        LLM("no-such-folder", compiled=True)


@pytest.mark.parametrize("max_num_seqs", [1, 8, 100, 128])
def test_decode_buckets_cover_every_batch_with_less_than_double_padding(max_num_seqs):
    buckets = decode_buckets(max_num_seqs)
    assert buckets[-1] == max_num_seqs and list(buckets) == sorted(set(buckets))
    assert len(buckets) <= max_num_seqs.bit_length() + 1   # a handful of graphs
    for batch in range(1, max_num_seqs + 1):
        bucket = bucket_for(batch, buckets)
        assert bucket in buckets and batch <= bucket < 2 * batch
    assert bucket_for(max_num_seqs + 1, buckets) is None   # larger steps run eagerly


@pytest.fixture
def no_cxx(monkeypatch):
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/shardline-no-cxx"))


def test_missing_compiler_fails_at_load_saying_what_to_install(no_cxx, tiny_llama_dir):
    with pytest.raises(CompilerMissingError, match=r"install g\+\+.*or run with compile=False"):
        check_compiler(torch.device("cpu"))
    # through the client: LLM() fails while loading, before any request runs
    with pytest.raises(CompilerMissingError, match="shardline-no-cxx"):
        LLM(str(tiny_llama_dir), compile=True)
    check_compiler(torch.device("cuda"))   # GPUs compile with Triton: nothing to check here
