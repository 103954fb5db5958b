"""The write/read bank of consistent self-attention: what a long story remembers of each character.

The official StoryDiffusion demo generates a character's reference panels together ("write") and stores a sample
of their self-attention input tokens, per denoising step and per layer; every later panel attends to its own
tokens plus the stored ones ("read"). :class:`ConsistencyBank` is that store, owned by the caller:

* its size is explicit (:meth:`ConsistencyBank.nbytes`) and predictable before generating
  (:func:`estimate_bank_nbytes`): per character,
  ``stored steps x guidance halves x bytes per value x sum over CSA layers of (sampled tokens x channels)``,
  where a layer of N tokens per image samples ``round(r * refs * N)`` of the reference images' tokens;
* it can live elsewhere than the model (``device="cpu"``) or in a smaller type (``dtype=torch.float16``);
* a character's tokens can be saved to a file and loaded in a later session (:meth:`ConsistencyBank.save`,
  :meth:`ConsistencyBank.load`), like the official demo's character files: a long story is generated page by page.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BANK_FORMAT", "BankLayer", "ConsistencyBank", "estimate_bank_nbytes"]

BANK_FORMAT = "sdlite-csa-bank-1"  # written into every saved bank file


class ConsistencyBank:
    """Sampled tokens of reference images, per character, per denoising step, per layer.

    ``write`` stores a (G, k, C) tensor (G = 2 guidance halves or 1) of a layer's input tokens;
    ``read`` returns them. Memory is explicit: :meth:`nbytes`; so is clearing: :meth:`clear`.

    Args:
        device: where stored tokens live (None: where they were computed). ``"cpu"`` keeps the bank out of GPU
            memory; each read copies one layer's tokens back.
        dtype: the type stored tokens are kept in (None: the model's). ``torch.float16`` halves a float32 bank;
            reads cast back to the model's type.
    """

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"bank dtype must be a floating torch.dtype (e.g. torch.float16) or None, got {dtype!r}")
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self._tokens: dict[str, dict[tuple[int | None, str], torch.Tensor]] = {}

    def write(self, character: str, step: int | None, layer: str, tokens: torch.Tensor) -> None:
        if not isinstance(character, str) or not character:
            raise ValueError(f"character must be a non-empty name, got {character!r}")
        if tokens.ndim != 3:
            raise ValueError(f"bank tokens must be (G, k, C), got shape {tuple(tokens.shape)}")
        tokens = tokens.detach().to(device=self.device or tokens.device, dtype=self.dtype or tokens.dtype)
        self._tokens.setdefault(character, {})[(step, layer)] = tokens

    def read(self, character: str, step: int | None, layer: str) -> torch.Tensor:
        entries = self._tokens.get(character)
        if not entries:
            known = sorted(self._tokens) or "none"
            raise ValueError(f"the bank holds no tokens for character {character!r} (characters stored: {known}): "
                             f"generate its reference images inside `with handle.write({character!r}):` first")
        if (step, layer) not in entries:
            raise ValueError(f"the bank has character {character!r} but nothing for step {step}, layer {layer!r}: "
                             "write and read must use the same steps (handle.set_step) and the same layers")
        return entries[(step, layer)]

    def has(self, character: str, step: int | None, layer: str) -> bool:
        return (step, layer) in self._tokens.get(character, {})

    def steps(self, character: str) -> list[int | None]:
        """The denoising steps stored for a character, in order."""
        return sorted({s for s, _ in self._tokens.get(character, {})}, key=lambda s: -1 if s is None else s)

    def layers(self, character: str) -> list[str]:
        return sorted({layer for _, layer in self._tokens.get(character, {})})

    def clear(self, character: str | None = None) -> None:
        """Forget one character's tokens, or everything (``character=None``)."""
        if character is None:
            self._tokens.clear()
        else:
            self._tokens.pop(character, None)

    @property
    def characters(self) -> list[str]:
        return sorted(self._tokens)

    def nbytes(self, character: str | None = None) -> int:
        """Bytes held by the bank (one character, or all)."""
        names = self.characters if character is None else [character]
        return sum(t.numel() * t.element_size() for n in names for t in self._tokens.get(n, {}).values())

    # -- character files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, character: str, settings: dict | None = None) -> Path:
        """Write one character's tokens to a safetensors file, with ``settings`` (JSON-able: the model, size,
        steps, layers ... the tokens were made with) so that a later :meth:`load` can be checked against a run."""
        from safetensors.torch import save_file

        entries = self._tokens.get(character)
        if not entries:
            raise ValueError(f"the bank holds nothing for {character!r} (stored: {self.characters or 'none'}): "
                             "generate its reference panels first")
        tensors = {f"{'none' if step is None else step}/{layer}": t.to("cpu").contiguous()
                   for (step, layer), t in entries.items()}
        meta = {"format": BANK_FORMAT, "character": character, "settings": json.dumps(settings or {})}
        path = Path(path)
        save_file(tensors, str(path), metadata=meta)
        return path

    def load(self, path: str | os.PathLike) -> tuple[str, dict]:
        """Add the character stored in a file written by :meth:`save`; returns (its name, its settings)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no character file at {path}: write one with `sdlite story ... "
                                    "--save-characters DIR` (or ConsistencyBank.save)")
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != BANK_FORMAT:
                    raise ValueError(f"{path} is not an sdlite character file (format {meta.get('format')!r}, "
                                     f"expected {BANK_FORMAT!r}): write it with --save-characters")
                entries = {}
                for key in handle.keys():
                    step, _, layer = key.partition("/")
                    entries[(None if step == "none" else int(step), layer)] = handle.get_tensor(key)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path} is not a readable character file ({' '.join(str(err).split())[:120]}): "
                             "write it again with --save-characters") from None
        character = meta["character"]
        self._tokens[character] = {}
        for (step, layer), t in entries.items():
            self.write(character, step, layer, t)
        return character, json.loads(meta.get("settings") or "{}")

    def __len__(self) -> int:
        return sum(len(v) for v in self._tokens.values())

    def __repr__(self) -> str:
        return f"ConsistencyBank(characters={self.characters}, entries={len(self)}, nbytes={self.nbytes()})"


# ----------------------------------------------------------------------------------------------------
# How large will it be? (before generating)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BankLayer:
    """One CSA layer as the bank sees it: tokens per image N (the layer's H*W grid), channels C, sampling rate r."""

    name: str
    tokens: int
    channels: int
    rate: float


def estimate_bank_nbytes(layers: list[BankLayer], refs: int, steps: int, groups: int, bytes_per_value: int,
                         sampling: str = "exact") -> int:
    """Bytes one character's bank takes: ``steps x groups x bytes x sum_l k_l * C_l``.

    ``refs`` reference images are written together; layer l stores ``k_l = round(r_l * refs * N_l)`` of their
    tokens (``sampling="exact"``: exactly, this equals :meth:`ConsistencyBank.nbytes` after the write) or, with
    ``sampling="official"``, each token with probability r_l (the expected size, ``r_l * refs * N_l`` rounded:
    the measured bank varies around it). ``steps``: the denoising steps stored; ``groups``: 2 with
    classifier-free guidance, 1 without; ``bytes_per_value``: 2 for a float16 bank, 4 for float32.
    """
    for name, v in (("refs", refs), ("steps", steps), ("groups", groups), ("bytes_per_value", bytes_per_value)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    per_step = sum(int(layer.rate * refs * layer.tokens + 0.5) * layer.channels for layer in layers)
    return steps * groups * bytes_per_value * per_step
