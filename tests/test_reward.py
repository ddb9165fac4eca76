"""The reward model (P-Score): its exposures are built from the history before each event,
it never trains on held-out events, it learns multi-behaviour feedback better than the
fixed formula's item average, and its ONNX export matches torch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from onerec.data.synthetic import SyntheticConfig, generate
from onerec.embeddings import item_embeddings
from onerec.reward import (
    HOLDOUT,
    ExposureLog,
    auc,
    build_reward_model,
    export_reward,
    head_aucs,
    predict,
    reward_parity,
    train_reward,
)
from onerec.runtime.engagement import HEAD_WEIGHTS, HEADS, engagement_score, is_positive
from onerec.runtime.onnx_runners import OnnxReward
from onerec.tokenizer import SemanticTokenizer, TokenizerConfig
from onerec.train import ItemTables
from onerec.train_config import RewardConfig

CFG = RewardConfig(
    d=16, hidden=32, pos_len=8, lr=3e-3, batch_size=128, events_per_epoch=20_000, epochs=6
)


@pytest.fixture(scope="module")
def setup():
    ds = generate(SyntheticConfig(n_users=300, n_items=400, max_history=600, min_history=20))
    _, emb = item_embeddings(ds.item_content, ds.user_index(), ds.item_index(), 8, 8)
    _, codes, _ = SemanticTokenizer.fit(emb, TokenizerConfig(codebook_size=8), progress=False)
    return ds, ItemTables.build(ds, emb, codes)


@pytest.fixture(scope="module")
def trained(setup):
    ds, tables = setup
    torch.manual_seed(0)
    model = build_reward_model(ds, tables, 8, CFG)
    log = ExposureLog(ds, CFG)
    result = train_reward(model, log)
    return model, log, result


def test_exposures_read_only_the_history_before_each_event(setup) -> None:
    ds, _ = setup
    log = ExposureLog(ds, CFG)
    items = ds.item_index()
    positive = is_positive(engagement_score(ds.events))
    user = ds.user_index()
    rows = np.random.default_rng(0).choice(len(items), 300, replace=False)
    got = log.exposures(rows)
    for j, i in enumerate(rows):
        before = np.flatnonzero((user == user[i]) & (np.arange(len(user)) < i))
        short = (items[before][::-1][: CFG.short_len] + 1).tolist()
        assert got.short_items[j][: len(short)].tolist() == short
        assert not got.short_items[j][len(short) :].any()
        pos = (items[before[positive[before]]][::-1][: CFG.pos_len] + 1).tolist()
        assert got.pos_items[j][: len(pos)].tolist() == pos
        assert got.items[j] == items[i] + 1


def test_each_users_last_events_are_held_out_of_training(setup) -> None:
    ds, _ = setup
    log = ExposureLog(ds, CFG)
    counts = np.diff(log.start)
    held = np.bincount(log.user[log.test_rows], minlength=ds.n_users)
    np.testing.assert_array_equal(held, np.minimum(HOLDOUT, counts // 2))
    last = log.start[1:] - 1
    assert np.isin(last[counts >= 2], log.test_rows).all()  # the generator's test events
    assert not np.isin(log.train_rows, log.test_rows).any()
    assert len(log.train_rows) + len(log.test_rows) == len(ds.events)


def test_auc_counts_ordered_pairs_and_ties_half() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.3
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()
    assert auc(labels, scores) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert auc(np.zeros(5, bool), np.arange(5.0)) is None


def test_the_heads_learn_each_behaviour_and_the_pscore_ranks_engagement(trained) -> None:
    """On this small set (400 items, ~35 exposures each) the formula's item average is a
    strong scorer and the model only matches it; on the default set it is clearly beaten
    (reports/align.md). Here: every head has learned its behaviour, and the P-Score ranks
    positive engagement up and hate down."""
    model, log, result = trained
    assert result["steps"] > 0
    aucs = head_aucs(log, predict(model, log.exposures(log.test_rows)))
    assert aucs["watch"]["head"] > 0.78 and aucs["click"]["head"] > 0.85
    assert min(aucs[h]["head"] for h in ("like", "follow", "comment", "forward")) > 0.6
    assert aucs["positive"]["pscore"] > 0.72
    assert aucs["hate"]["head"] > 0.6 and aucs["hate"]["pscore"] < 0.4


def test_the_pscore_is_the_engagement_formula_over_the_heads(trained) -> None:
    model, log, _ = trained
    batch = log.exposures(log.test_rows[:8])
    with torch.no_grad():
        heads, pscore = model.scores(*batch.tensors(np.arange(8)))
    np.testing.assert_allclose(pscore.numpy(), heads.numpy() @ HEAD_WEIGHTS, rtol=1e-6)
    assert heads.shape[-1] == len(HEADS)


def test_the_onnx_export_matches_torch(trained, tmp_path) -> None:
    model, log, _ = trained
    runner = OnnxReward(export_reward(model, tmp_path / "reward.onnx"), threads=1)
    exposures = log.exposures(log.test_rows[:32])
    assert reward_parity(model, runner, exposures) <= 1e-4
    longer = replace(exposures, pos_items=np.pad(exposures.pos_items, ((0, 0), (0, 200))))
    assert reward_parity(model, runner, longer) <= 1e-4  # a request's 256 positives


def test_the_served_flop_count_matches_torchs(trained) -> None:
    """MFU counts the reward stage by RewardMeta.flops; torch counts what runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from onerec.reward import ServedReward, reward_meta

    model, log, _ = trained
    served = ServedReward(model)
    exposures = log.exposures(log.test_rows[:3])
    candidates = np.tile(exposures.items[:, None], (1, 37))
    inputs = (exposures.static, exposures.short_items, exposures.pos_items, candidates)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        served(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
    meta = reward_meta(model, blend=0.0)
    assert counter.get_total_flops() == 3 * meta.flops(37, exposures.short_items.shape[1])
    assert (
        meta.static_cardinalities == tuple(int(c) + 1 for c in exposures.static.max(0))
        or len(meta.static_cardinalities) == exposures.static.shape[1]
    )
