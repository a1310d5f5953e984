"""Prompts longer than CLIP reads, in chunks of 75 tokens, as AUTOMATIC1111 and ComfyUI read them.

CLIP's position table has 77 places (start token, 75 tokens, end token); diffusers cuts a longer prompt
there. A1111 instead splits the prompt's tokens into chunks of 75, encodes each chunk on its own as
start + chunk + end + padding, and concatenates the chunks' hidden states along the sequence: the UNet's
cross-attention reads a sequence of any length. Its rules, kept here:

- a full chunk whose last comma is within its last 20 tokens ends after that comma, and the tokens after
  the comma open the next chunk (A1111's `comma_padding_backtrack` = 20), so a phrase is not torn apart;
- the negative prompt gets as many chunks as the prompt (and the other way round); missing ones are empty
  (start, end, padding);
- the pooled text embedding (SDXL) is the first chunk's.

Not read: A1111's emphasis syntax "(word:1.2)" / "[word]"; brackets are plain text here. A prompt that
fits one chunk is not touched: it goes to diffusers as text, as before.
"""

from __future__ import annotations

import torch

CHUNK = 75  # tokens between the start and end tokens
BACKTRACK = 20  # a full chunk breaks after a comma this close to its end
MAX_CHUNKS = 8  # 600 tokens; the rest is cut (said and recorded like any cut)


def split(tokenizer, text: str) -> list[list[int]]:
    """The prompt's token ids (no start/end tokens) in chunks of at most CHUNK; at least one chunk."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma = comma[0] if len(comma) == 1 else None
    chunks, chunk, last_comma = [], [], -1
    for token in ids:
        if token == comma:
            last_comma = len(chunk)
        elif len(chunk) == CHUNK and last_comma >= 0 and len(chunk) - last_comma <= BACKTRACK:
            chunks.append(chunk[:last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1:], -1
        if len(chunk) == CHUNK:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def count(tokenizer, text: str) -> int:
    """How many chunks the prompt takes (1 when it fits CLIP's 75 tokens)."""
    return len(split(tokenizer, text)) if text else 1


def token_rows(tokenizer, texts: list[str], chunks: int) -> torch.Tensor:
    """(len(texts) * chunks, CHUNK + 2) token ids: each text's chunks, padded with empty ones to `chunks`."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    rows = []
    for text in texts:
        parts = split(tokenizer, text)[:chunks]
        parts += [[]] * (chunks - len(parts))
        rows += [[start, *part, end] + [pad] * (CHUNK - len(part)) for part in parts]
    return torch.tensor(rows, dtype=torch.long)


def encode(encoder, tokenizer, texts: list[str], chunks: int, *, penultimate: bool = False):
    """(hidden states (batch, chunks * 77, width), the encoder's first output per text's first chunk).

    `penultimate`: the second-to-last layer's states, as SDXL reads both of its CLIPs."""
    ids = token_rows(tokenizer, texts, chunks).to(encoder.device)
    out = encoder(ids, output_hidden_states=penultimate)
    states = out.hidden_states[-2] if penultimate else out[0]
    first = out[0].reshape(len(texts), chunks, *out[0].shape[1:])[:, 0]
    return states.reshape(len(texts), -1, states.shape[-1]), first


def cut(tokenizer, prompt: str) -> dict | None:
    """What reading `prompt` in at most MAX_CHUNKS chunks drops: {"tokens": kept, "dropped": text}, or None."""
    parts = split(tokenizer, prompt)
    if len(parts) <= MAX_CHUNKS:
        return None
    dropped = tokenizer.decode([t for part in parts[MAX_CHUNKS:] for t in part], skip_special_tokens=True).strip()
    return {"tokens": sum(len(part) for part in parts[:MAX_CHUNKS]), "dropped": dropped} if dropped else None
