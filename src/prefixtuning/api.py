"""A trained model in three lines:

    from prefixtuning import PrefixTuned
    model = PrefixTuned.from_pretrained("exports/e2e")          # an export dir or a train.py checkpoint
    model.generate([{"name": "Blue Spice", "eatType": "pub"}], num_beams=5)
    model.save_pretrained("exports/e2e-copy")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from .data.e2e import linearize_mr
from .data.features import Featurizer
from .data.triples import linearize_triples
from .decoding import decode
from .export import export_model
from .loading import load_trained


class PrefixTuned:
    """A frozen backbone with its trained method (a prefix, or any baseline of `method/`), the dataset's
    input format and the run's decoding settings."""

    def __init__(self, model, run_config):
        self.model = model.eval()
        self.config = run_config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PrefixTuned":
        """Load an export directory (export.py / `save_pretrained`) or a train.py checkpoint (.ckpt)."""
        model, cfg = load_trained(path)
        return cls(model, cfg)

    @property
    def task(self) -> str:
        return str(self.config.data.name)

    def linearize(self, item: Any) -> str:
        """An input as the model saw it in training: a dict of E2E slots (`{"name": ..., "eatType": ...}`),
        a list of (subject, property, object) triples (WebNLG, DART), or already linearized text."""
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            if not item:
                raise ValueError("an empty meaning representation")
            return linearize_mr(", ".join(f"{k}[{v}]" for k, v in item.items()))  # checked like the data files
        if isinstance(item, (list, tuple)) and item and all(isinstance(t, (list, tuple)) and len(t) == 3 for t in item):
            return linearize_triples([tuple(map(str, t)) for t in item])
        raise TypeError(f"cannot read {item!r} as an input: give a dict of slots, a list of (s, p, o) triples, "
                        f"or text")

    def generate(self, inputs: Sequence[Any], batch_size: int = 16, progress: bool = False, **decoding) -> list[str]:
        """Outputs for `inputs`, in order, decoded with the run's settings (`decoding/` group of the
        training config), overridden by keyword arguments (num_beams=5, max_new_tokens=..., ...)."""
        cfg = OmegaConf.merge(self.config.decoding, decoding)
        feat = Featurizer(self.model.backbone.tokenizer, self.model.backbone.is_encoder_decoder,
                          max_source_tokens=self.config.data.get("max_source_tokens"))
        prompts = [feat.prompt_ids(self.linearize(x)) for x in inputs]
        return decode(self.model, prompts, cfg, batch_size=batch_size, progress=progress)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write what inference needs (the prefix without its MLP, or the method's trained tensors) and the
        training config; `from_pretrained(path)` loads it back."""
        path = Path(path)
        export_model(self.model, path, OmegaConf.to_container(self.config, resolve=True))
        return path
