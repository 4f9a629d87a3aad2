import numpy as np
import pytest
import torch

from models.encoders import IMAGE_DIMS, TEXT_DIMS
from models.queries import TRAIN_TEMPLATES, QueryGenerator
from models.ranker import STRATEGIES, FusedRanker, ItemEncoderHead, OnlineScorer, RankerConfig
from models.train import ListBatchData, TrainConfig, listwise_loss, train_ranker


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_shapes(strategy):
    model = FusedRanker(RankerConfig(strategy=strategy)).eval()
    queries, lists = 3, 7
    scores, retrieval = model.forward_lists(
        torch.randn(queries, TEXT_DIMS),
        torch.randn(queries, lists, TEXT_DIMS),
        torch.randn(queries, lists, model.reduce_image(torch.randn(1, IMAGE_DIMS)).shape[-1]),
    )
    assert scores.shape == retrieval.shape == (queries, lists)
    features = ItemEncoderHead(model)(torch.randn(5, TEXT_DIMS), torch.randn(5, IMAGE_DIMS))
    assert features.shape == (5, 128)
    score, text, image = OnlineScorer(model)(
        torch.randn(2, TEXT_DIMS), features.half(), torch.tensor([0, 1, 1, 0, 1])
    )
    assert score.shape == text.shape == image.shape == (5,)
    assert torch.isfinite(score).all()


@pytest.mark.parametrize("strategy", ["representation", "late"])
def test_contributions_add_up_where_the_strategy_is_additive(strategy):
    model = FusedRanker(RankerConfig(strategy=strategy)).eval()
    score, text, image = OnlineScorer(model)(
        torch.randn(1, TEXT_DIMS), torch.randn(4, 128).half(), torch.zeros(4, dtype=torch.long)
    )
    assert torch.allclose(score, text + image, atol=1e-5)


def test_single_modality_variant_has_half_the_features():
    model = FusedRanker(RankerConfig(strategy="early", modalities=("text",)))
    assert model.item_features(torch.randn(2, TEXT_DIMS), torch.randn(2, 1)).shape == (2, 64)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="strategy must be one of"):
        RankerConfig(strategy="middle")


def test_listwise_loss_prefers_the_right_order():
    grades = torch.tensor([[3, 0, 1, -1]])
    good = listwise_loss(torch.tensor([[5.0, -5.0, 0.0, 0.0]]), grades)
    bad = listwise_loss(torch.tensor([[-5.0, 5.0, 0.0, 0.0]]), grades)
    assert good < bad


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_few_training_steps_lower_the_loss(strategy, sample_slice_embeddings):
    products, text, image = sample_slice_embeddings
    queries = QueryGenerator(products, seed=0).generate(64, TRAIN_TEMPLATES, 24)
    from models.embeddings import encode_texts

    data = ListBatchData.build(
        queries, encode_texts([q.text for q in queries]), {p.id: i for i, p in enumerate(products)}
    )
    _, losses = train_ranker(
        RankerConfig(strategy=strategy),
        data,
        text,
        image,
        None,
        TrainConfig(epochs=4, batch_queries=16, strip_colour_p=0.0),
    )
    assert losses[-1] < losses[0]
    assert np.isfinite(losses).all()
