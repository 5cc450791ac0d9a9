"""The Python API in three lines: raw inputs (E2E slots, triples) or text, the run's decoding, and a
save/load round trip, equal to what evaluate.py decodes for the same inputs."""

import pytest
import torch

from conftest import compose_cfg
from prefixtuning.training import train

SMALL = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.limit_train_batches=2", "optim.epochs=1",
         "test_after_training=false", "val_generation.enabled=false", "validate_before_training=false"]


def test_three_lines_from_export_and_checkpoint_equal_the_evaluate_path(tmp_path):
    from prefixtuning import PrefixTuned
    from prefixtuning.loading import load_trained
    from prefixtuning.data.datamodule import PrefixDataModule
    from prefixtuning.decoding import decode
    from prefixtuning.export import export_checkpoint

    train(compose_cfg(SMALL + ["prefix=reparam", "prefix.mid_dim=16"], tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export_checkpoint(ckpt, tmp_path / "export")

    model = PrefixTuned.from_pretrained(tmp_path / "export")
    raw = [{"name": "Blue Spice", "eatType": "pub"}, {"name": "The Mill", "food": "Chinese", "area": "riverside"}]
    outs = model.generate(raw, num_beams=2, max_new_tokens=6, min_new_tokens=1)
    assert model.linearize(raw[0]) == "name : Blue Spice | Type : pub"
    # the same as decoding the linearized text through evaluate.py's code path, on the checkpoint
    m, cfg = load_trained(ckpt)
    dm = PrefixDataModule(cfg.data, m.backbone.tokenizer, False)
    dec = {**dict(cfg.decoding), "num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 1}
    from omegaconf import OmegaConf

    ref = decode(m, [dm.featurizer.prompt_ids(model.linearize(x)) for x in raw], OmegaConf.create(dec), progress=False)
    assert outs == ref
    assert PrefixTuned.from_pretrained(ckpt).generate(raw, num_beams=2, max_new_tokens=6, min_new_tokens=1) == outs
    assert model.generate([model.linearize(x) for x in raw], num_beams=2, max_new_tokens=6, min_new_tokens=1) == outs

    copy = model.save_pretrained(tmp_path / "copy")
    again = PrefixTuned.from_pretrained(copy)
    assert again.generate(raw, num_beams=2, max_new_tokens=6, min_new_tokens=1) == outs
    with pytest.raises(ValueError, match="unknown attribute 'colour'"):
        model.generate([{"name": "X", "colour": "red"}])
    with pytest.raises(TypeError, match="cannot read 42 as an input"):
        model.generate([42])


def test_triples_and_other_methods(tmp_path):
    from prefixtuning import PrefixTuned

    train(compose_cfg(SMALL + ["method=lora", "data=webnlg_sample"], tmp_path / "run"))
    model = PrefixTuned.from_pretrained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    triples = [("Aarhus_Airport", "cityServed", "Aarhus")]
    assert model.linearize(triples) == "Aarhus_Airport : cityServed : Aarhus"
    out = model.generate([triples], num_beams=1, max_new_tokens=4, min_new_tokens=1)
    # equal to evaluate.py's path on the checkpoint, fed the linearized triple through the dataset's featurizer
    from omegaconf import OmegaConf
    from prefixtuning.data.datamodule import PrefixDataModule
    from prefixtuning.decoding import decode
    from prefixtuning.loading import load_trained

    m, cfg = load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    dm = PrefixDataModule(cfg.data, m.backbone.tokenizer, False)
    dec = OmegaConf.merge(cfg.decoding, {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 1})
    assert out == decode(m, [dm.featurizer.prompt_ids("Aarhus_Airport : cityServed : Aarhus")], dec, progress=False)
    assert len(out) == 1 and out[0].strip()  # min_new_tokens=1: something was generated
    saved = model.save_pretrained(tmp_path / "lora")
    assert (saved / "method.json").is_file()
    assert PrefixTuned.from_pretrained(saved).generate([triples], num_beams=1, max_new_tokens=4,
                                                       min_new_tokens=1) == out
    torch.manual_seed(0)
