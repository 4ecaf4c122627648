"""The offline default model: a small GPT-2 trained in a few minutes on CPU on the stdlib's prose.

No model hub is reachable from the machines this project runs on, so the default model is made
locally: a byte-level BPE tokenizer (GPT-2 style, `<|endoftext|>` as BOS, EOS and UNK) and a
`GPT2LMHeadModel`, both saved with `save_pretrained` into one Hugging Face model directory that
`services.model.load_model` (and `AutoModelForCausalLM` / `AutoTokenizer`) load back.

Training is deterministic for a seed on a given machine: a fixed step count, a seeded
initialisation and data order, and a fixed thread count. The corpus is the Python standard
library's documentation (`offline/corpus.py`), copied into the model directory so that the data a
model was trained on travels with it.
"""

import hashlib
import json
import math
import os
import platform
import time

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from actserve.offline.corpus import write_stdlib_corpus
from actserve.services.data import iter_sequences
from actserve.services.process_memory import keep_freed_heap_memory

METADATA_FILE = "actserve_tiny_model.json"
STDLIB_CORPUS_FILE = "stdlib_corpus.jsonl"
# GPT-2's single special token, used as BOS, EOS and UNK alike.
SPECIAL_TOKEN = "<|endoftext|>"

DEFAULT_MAX_STEPS = 800
# The thread count changes floating-point reduction order, so it is a setting of the model (the
# same count gives the same weights). Default one thread: on a busy 2-core machine two OpenMP
# threads ran a step up to 15x slower than one (each waits for the other to be scheduled); on an
# idle one they are 1.7-1.9x faster, which the demo uses (it has the machine to itself).
TRAIN_THREADS = 1
# Measured on the stdlib corpus, held-out loss after 245k tokens: 6.37 with batches of 16 and one
# learning rate (3e-3), 4.99 with batches of 4, embeddings at 0.1 and an untied unembedding. With
# one shared rate a model this small sits near the unigram loss (6.65) for hundreds of steps.
LEARNING_RATE = 3e-3
EMBEDDING_LEARNING_RATE = 0.1
EMBEDDING_PARAMETERS = ("transformer.wte.weight", "transformer.wpe.weight")
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
# One document in HELDOUT_EVERY goes to the held-out split, never seen by tokenizer or model.
HELDOUT_EVERY = 20
# The reported train loss averages the last steps: one batch's loss is noisy.
FINAL_LOSS_STEPS = 20
LOSS_CURVE_EVERY = 25


def make_tiny_model(
    out_dir,
    *,
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 128,
    n_heads: int = 4,
    n_ctx: int = 128,
    vocab_size: int = 4096,
    max_steps: int | None = None,
    train_seconds: float | None = None,
    batch_size: int = 8,
    threads: int = TRAIN_THREADS,
    corpus_path=None,
    progress: bool = True,
) -> dict:
    """Train a small GPT-2 and its tokenizer into `out_dir`; return the run's metadata.

    Training runs `max_steps` optimizer steps of `batch_size` sequences of `n_ctx` tokens
    (DEFAULT_MAX_STEPS when neither limit is given). `train_seconds` instead trains for a
    wall-clock budget; it applies only when `max_steps` is None, because such a run is not
    reproducible. `threads`: torch's thread count while training, a setting like the others
    (another count gives other weights).
    `corpus_path` is a jsonl file of `{"text": ...}` lines; by default the standard library's
    docstrings are written to `out_dir/stdlib_corpus.jsonl` and used.
    If `out_dir` already holds a finished model with the same settings, it is kept and its
    metadata returned (`reused` is True).
    """
    if max_steps is None and train_seconds is None:
        max_steps = DEFAULT_MAX_STEPS
    if max_steps is not None:
        train_seconds = None  # a fixed step count is what makes the run reproducible
    out_dir = os.fspath(out_dir)
    metadata_path = os.path.join(out_dir, METADATA_FILE)
    settings = {
        "seed": seed,
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "n_ctx": n_ctx,
        "vocab_size": vocab_size,
        "max_steps": max_steps,
        "train_seconds": train_seconds,
        "batch_size": batch_size,
        "threads": threads,
        "corpus": _corpus_identity(corpus_path),
    }
    existing = _read_metadata(metadata_path)
    if existing is not None and existing["settings"] == settings:
        return {**existing, "reused": True}

    os.makedirs(out_dir, exist_ok=True)
    # The metadata marks a finished model: remove it before overwriting the files it describes.
    if existing is not None:
        os.remove(metadata_path)
    if corpus_path is None:
        corpus_path = os.path.join(out_dir, STDLIB_CORPUS_FILE)
        write_stdlib_corpus(corpus_path)
    texts = _read_texts(corpus_path)
    train_texts = [text for index, text in enumerate(texts) if index % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout_texts = [text for index, text in enumerate(texts) if index % HELDOUT_EVERY == HELDOUT_EVERY - 1]

    tokenizer = _train_tokenizer(train_texts, vocab_size)
    bos_id = tokenizer.token_to_id(SPECIAL_TOKEN)
    train_sequences = _pack_sequences(tokenizer, train_texts, n_ctx, bos_id)
    heldout_sequences = _pack_sequences(tokenizer, heldout_texts, n_ctx, bos_id)
    if len(train_sequences) < batch_size or len(heldout_sequences) == 0:
        raise ValueError(
            f"corpus {corpus_path} is too small: {len(train_sequences)} training and {len(heldout_sequences)} "
            f"held-out sequences of {n_ctx} tokens, need at least batch_size={batch_size} and 1"
        )

    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=n_ctx,
        # TransformerLens reads hf_config.n_ctx, which transformers 5 no longer sets by itself.
        n_ctx=n_ctx,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        # A separate unembedding learned faster than GPT-2's tied one (same steps, lower loss).
        tie_word_embeddings=False,
        # Short training on a small corpus: dropout would only slow the loss down.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_id,
        eos_token_id=bos_id,
    )
    keep_freed_heap_memory()  # ~1.2M fewer page faults per 150 steps, ~5% of the training's time
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # fork_rng keeps the caller's global torch RNG state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
            run = _train(model, train_sequences, seed, max_steps, train_seconds, batch_size, progress)
            heldout_loss = _mean_loss(model, heldout_sequences, batch_size)
    finally:
        torch.set_num_threads(previous_threads)

    model.save_pretrained(out_dir)
    _as_transformers_tokenizer(tokenizer, n_ctx).save_pretrained(out_dir)
    metadata = {
        "settings": settings,
        **run,
        "heldout_loss": heldout_loss,
        "ln_vocab_size": math.log(config.vocab_size),
        "corpus_documents": len(texts),
        "train_tokens_available": int(train_sequences.numel()),
        "heldout_tokens": int(heldout_sequences.numel()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    with open(metadata_path, "w", encoding="utf-8") as out:
        json.dump(metadata, out, indent=2)
    return {**metadata, "reused": False}


def _train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is in the alphabet, so no text is out of vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _as_transformers_tokenizer(tokenizer: Tokenizer, n_ctx: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=n_ctx,
    )


def _pack_sequences(tokenizer: Tokenizer, texts: list[str], n_ctx: int, bos_id: int) -> torch.Tensor:
    """The documents as rows of n_ctx tokens, cut the way the cache builder cuts them
    (`iter_sequences`: BOS-joined, each row starting with BOS); the incomplete last row is dropped."""
    documents = (encoding.ids for encoding in tokenizer.encode_batch(texts))
    return torch.from_numpy(np.stack(list(iter_sequences(documents, n_ctx, bos_id)))).long()


def _train(model, sequences, seed, max_steps, train_seconds, batch_size, progress) -> dict:
    """Train for max_steps steps (reproducible) or, when max_steps is None, for train_seconds."""
    parameters = dict(model.named_parameters())
    embeddings = [parameters.pop(name) for name in EMBEDDING_PARAMETERS]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(parameters.values()), "peak_lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY},
            {"params": embeddings, "peak_lr": EMBEDDING_LEARNING_RATE, "weight_decay": 0.0},
        ]
    )
    batches = _batches(sequences, batch_size, seed)
    losses = []
    loss_curve = []
    model.train()
    start = time.perf_counter()
    with tqdm(total=max_steps, desc="tiny model", unit="step", disable=not progress) as bar:
        while True:
            if max_steps is not None:
                if len(losses) == max_steps:
                    break
                fraction_done = (len(losses) + 1) / max_steps
            else:
                fraction_done = (time.perf_counter() - start) / train_seconds
                if fraction_done >= 1:
                    break
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * _lr_factor(fraction_done)
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % LOSS_CURVE_EVERY == 1:
                loss_curve.append([len(losses), round(losses[-1], 4)])
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    seconds = time.perf_counter() - start
    model.eval()
    final_losses = losses[-FINAL_LOSS_STEPS:]
    return {
        "steps": len(losses),
        "seconds": round(seconds, 2),
        "train_loss": sum(final_losses) / len(final_losses),
        "tokens_seen": len(losses) * batch_size * sequences.shape[1],
        "loss_curve": loss_curve,
    }


def _lr_factor(fraction_done: float) -> float:
    """Linear warmup, then cosine decay to FINAL_LR_FRACTION of the peak at the end of training."""
    if fraction_done < WARMUP_FRACTION:
        return fraction_done / WARMUP_FRACTION
    decayed = min(1.0, (fraction_done - WARMUP_FRACTION) / (1 - WARMUP_FRACTION))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decayed))


def _batches(sequences: torch.Tensor, batch_size: int, seed: int):
    """Endless batches: each epoch visits every sequence once, in an order fixed by the seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(sequences), generator=generator)
        for first in range(0, len(order) - batch_size + 1, batch_size):
            yield sequences[order[first : first + batch_size]]


@torch.no_grad()
def _mean_loss(model, sequences: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first : first + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(sequences)


def _corpus_identity(corpus_path) -> str:
    """What the corpus is, for deciding whether an existing model was trained on the same data."""
    if corpus_path is None:
        # The stdlib corpus is a function of the Python build that generates it.
        return f"python-stdlib-docstrings {platform.python_version()}"
    with open(corpus_path, "rb") as corpus:
        return "sha256:" + hashlib.sha256(corpus.read()).hexdigest()


def _read_metadata(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as metadata:
            return json.load(metadata)
    except FileNotFoundError:
        return None


def _read_texts(corpus_path) -> list[str]:
    with open(corpus_path, encoding="utf-8") as corpus:
        return [json.loads(line)["text"] for line in corpus if line.strip()]
