import json

from core.services.choices import model_choices


def test_picker_lists_only_checkpoints_with_a_card(monkeypatch, tmp_path):
    import core.services.choices

    monkeypatch.setattr(core.services.choices, "card_path", lambda name: tmp_path / f"{name}.json")
    choices = model_choices()
    assert [c.key for c in choices] == ["untrained:resnet20", "synthetic:mlp"]
    assert "UNTRAINED" in choices[0].label and not choices[0].trained
    (tmp_path / "cifar_cnn.json").write_text(json.dumps({"test_accuracy": 0.9}))
    keys = [c.key for c in model_choices()]
    assert keys == ["pretrained:cifar_cnn", "synthetic:mlp"]
