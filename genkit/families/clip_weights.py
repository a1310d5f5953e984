"""A1111-weighted prompts for CLIP text encoders: A1111's chunks, compel's weighting.

A prompt with weights (genkit.prompt_syntax) is read as AUTOMATIC1111 reads it: each piece is tokenized on its own,
its tokens carry its weight, and the tokens fill 75-token chunks by genkit.families.clip_chunks' rules (a late
comma moves the chunk's tail to the next one) with one more: BREAK closes the chunk. Each chunk is encoded on its
own as start + tokens + end + padding.

The weights are applied by compel (`EmbeddingsProvider.build_weighted_embedding_tensor`, compel 2.x), the
prompt-weighting library diffusers' documentation uses: a token of weight w gets the state
`empty + (state - empty) * w`, where `empty` is the encoder's state at that position for the empty prompt, and a
token of weight 1 keeps its state exactly. So a weight moves that token's states and no other token's. (A1111
multiplies the states by w and then rescales the whole chunk to its former mean; compel's rule leaves the other
tokens alone and reads weights below 1 as "towards the empty prompt".) SDXL's pooled text is the second encoder's
first chunk, unweighted, as A1111 and compel both take it.
"""

from __future__ import annotations

import torch

from genkit.errors import GenkitError, term
from genkit.families.clip_chunks import BACKTRACK, CHUNK, MAX_CHUNKS
from genkit.prompt_syntax import BREAK, parse



def require_compel() -> None:
    """A GenkitError in one line when compel is not installed (checked when a weighted prompt is planned)."""
    try:
        import compel  # noqa: F401
    except ImportError:
        raise GenkitError(f"uses A1111's weight syntax, which needs compel: pip install compel (or pass "
                          f"{term('prompt_syntax')} plain to read brackets as text)", param="prompt") from None


def split(tokenizer, text: str) -> list[list[tuple[int, float]]]:
    """The prompt's (token id, weight) pairs (no start/end tokens) in chunks of at most CHUNK; at least one chunk."""
    pieces = parse(text)
    words = [piece for piece, _ in pieces if piece is not BREAK]
    ids = iter(tokenizer(words, add_special_tokens=False, truncation=False).input_ids if words else [])
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma = comma[0] if len(comma) == 1 else None
    chunks, chunk, last_comma = [], [], -1

    def close():
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for piece, weight in pieces:
        if piece is BREAK:
            close()
            continue
        for token in next(ids):
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == CHUNK and last_comma >= 0 and len(chunk) - last_comma <= BACKTRACK:
                tail = chunk[last_comma + 1:]
                chunk = chunk[:last_comma + 1]
                close()
                chunk = tail
            if len(chunk) == CHUNK:
                close()
            chunk.append((token, weight))
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def count(tokenizer, text: str) -> int:
    """How many chunks the weighted prompt takes (at most MAX_CHUNKS; the rest is cut)."""
    return min(len(split(tokenizer, text)), MAX_CHUNKS) if text else 1


def rows(tokenizer, text: str, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, weights), each (chunks * (CHUNK + 2),): the prompt's chunks padded with empty ones to `chunks`."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    parts = split(tokenizer, text)[:chunks] if text else [[]]
    parts += [[]] * (chunks - len(parts))
    ids, weights = [], []
    for part in parts:
        ids += [start, *(token for token, _ in part), end] + [pad] * (CHUNK - len(part))
        weights += [1.0, *(weight for _, weight in part), 1.0] + [1.0] * (CHUNK - len(part))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def encode(encoder, tokenizer, texts: list[str], chunks: int, *, penultimate: bool = False) -> torch.Tensor:
    """(len(texts), chunks * 77, width): each text's weighted states through compel; `penultimate`: the
    second-to-last layer's states, as SDXL reads its CLIPs."""
    from compel.embeddings_provider import EmbeddingsProvider, ReturnedEmbeddingsType

    kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED if penultimate else \
        ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    provider = EmbeddingsProvider(tokenizer=tokenizer, text_encoder=encoder, returned_embeddings_type=kind,
                                  truncate=False, device=encoder.device)
    states = []
    with torch.no_grad():
        for text in texts:
            ids, weights = rows(tokenizer, text, chunks)
            states.append(provider.build_weighted_embedding_tensor(ids.to(encoder.device), weights,
                                                                   device=encoder.device)[0])
    return torch.stack(states).to(encoder.dtype)


def pooled(encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    """SDXL's pooled text: the projection of each text's first chunk (unweighted, as A1111 and compel take it)."""
    ids = torch.stack([rows(tokenizer, text, 1)[0] for text in texts]).to(encoder.device)
    with torch.no_grad():
        return encoder(ids)[0]
