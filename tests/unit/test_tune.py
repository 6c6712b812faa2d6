"""training.tune's starting trial: the searched values a configuration trains with, inside the space only."""

from __future__ import annotations

from dataclasses import replace

from models.config import ModelConfig
from training.config import TrainConfig
from training.tune import SEARCH_SPACE, searched, starting_values, with_values


def model(cfg: TrainConfig) -> ModelConfig:
    return ModelConfig(n_items=10, n_categories=3, **cfg.model_options)


def test_starting_values_are_what_the_configuration_trains_with() -> None:
    cfg = TrainConfig(
        model="din",
        lr=3e-3,
        history_dropout=0.7,
        feedback_dropout=0.2,
        model_options={"attention_softmax": True, "history_feedback": True},
    )
    values = starting_values(cfg)
    assert set(values) == set(SEARCH_SPACE)  # every searched value of this configuration lies in the space
    assert (values["lr"], values["history_dropout"], values["feedback_dropout"]) == (3e-3, 0.7, 0.2)
    assert values["model_options.attention_softmax"] is True
    assert values["ema_decay"] == TrainConfig().ema_decay  # the default average is a point of the space
    # options the configuration leaves unset are the model's defaults, which it trains with
    assert (values["model_options.item_dim"], values["model_options.mlp_activation"]) == (32, "dice")
    # the enqueued trial trains the starting configuration itself: the same settings, the same model
    tuned = with_values(cfg, values)
    assert replace(tuned, model_options=cfg.model_options) == cfg
    assert model(tuned) == model(cfg)


def test_values_outside_the_space_are_left_to_the_sampler() -> None:
    cfg = TrainConfig(model="din", lr=0.5, history_dropout=0.9, model_options={"item_dim": 24, "dropout": 0.1})
    values = starting_values(cfg)
    assert not {"lr", "history_dropout", "model_options.item_dim"} & set(values)
    assert values["model_options.dropout"] == 0.1
    assert "feedback_dropout" not in values  # not searched: no history feedback
    assert set(values) <= set(searched(cfg))


def test_a_model_without_attention_gets_no_attention_values() -> None:
    values = starting_values(TrainConfig(model="base"))
    assert not any(name.startswith("model_options.attention") for name in values)
    assert values["lr"] == TrainConfig().lr
