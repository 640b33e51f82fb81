"""Shared pytest fixtures: the real kv-compress binary and a small random Llama.

Nothing here downloads anything. The model fixture has TinyLlama's cache geometry
(22 layers, 4 KV heads, head_dim 64) with a tiny hidden size so it runs on a CPU in
milliseconds; the tokenizer is a byte-level BPE trained in memory on a few sentences.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
GO_TESTDATA = REPO_ROOT / "pkg" / "compression" / "testdata"

TINY_VOCAB = 512
TINY_LAYERS = 22
TINY_KV_HEADS = 4
TINY_HEAD_DIM = 64

_SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Robert Boulter is an English film, "
    "television and theatre actor. He had a guest starring role on the television series "
    "The Bill in 2000. Valkyria Chronicles III is a tactical role-playing video game. "
    "Tropical Storm Fay formed in the western Caribbean Sea and moved north. "
) * 4


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kv_compress_bin() -> str:
    """Path to the real ``kv-compress`` binary, built with ``go build`` when missing.

    Also exported as ``KV_COMPRESS_PATH`` so the bridge finds the same binary.
    """
    path = os.environ.get("KV_COMPRESS_PATH") or str(REPO_ROOT / "bin" / "kv-compress")
    if not Path(path).is_file():
        if shutil.which("go") is None:
            pytest.fail("kv-compress is not built and Go is not installed: run `make build-compress`")
        path = str(REPO_ROOT / "bin" / "kv-compress")
        # The Makefile's build (with the vector encoder where the toolchain has it) when make is
        # there, so the tests check the binary users run; plain `go build` otherwise.
        cmd = ["make", "build-compress"] if shutil.which("make") else ["go", "build", "-o", path, "./cmd/compress"]
        subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    os.environ["KV_COMPRESS_PATH"] = path
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a vocabulary of at most ``TINY_VOCAB`` ids, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_tiny_llama(
    num_layers: int = TINY_LAYERS,
    num_kv_heads: int = TINY_KV_HEADS,
    head_dim: int = TINY_HEAD_DIM,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``LlamaForCausalLM`` with the given cache geometry (GQA 2:1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = 2 * num_kv_heads
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


# A small Gemma 3: sliding-window layers (window GEMMA_WINDOW) before one full layer, head_dim 256.
GEMMA_LAYERS = 4
GEMMA_WINDOW = 8
GEMMA_HEAD_DIM = 256


def make_tiny_gemma3(seed: int = 0):
    """A random float32 ``Gemma3ForCausalLM``: 4 layers (3 sliding, window 8, then 1 full), 1 KV head, head_dim 256."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=GEMMA_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=GEMMA_HEAD_DIM, sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention"] * (GEMMA_LAYERS - 1) + ["full_attention"], max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=0,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """A random float32 Llama with TinyLlama's cache geometry: 22 layers, 4 KV heads, head_dim 64."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama, tiny_tokenizer) -> Path:
    """The tiny Llama and its tokenizer saved as a local transformers folder (for ``--model PATH``)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
